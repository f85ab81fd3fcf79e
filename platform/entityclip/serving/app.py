"""Ray Serve application: one autoscaled deployment whose replicas each hold a `Retriever`
(model, FAISS index, explanation engine with its LRU cache) and answer HTTP themselves, behind
HAProxy (runtime.SERVE_ENV). A separate, batched `Explainer` deployment (serving/explainer.py)
exists only for an LLM engine that needs a GPU (and, for vLLM, its own interpreter); on CPU the
replicas explain in-process (`explainer_deployment`).

Endpoints (JSON):
- POST /search/text   {"text", "k"?, "explanation"?} → images ranked for the text
- POST /search/image  {"image_base64", "k"?}          → texts ranked for the image
- POST /score         {"text", "image_base64", "explanation"?} → similarity and P(match)
- GET  /healthz       → status, index size and the model that answers
- GET  /              → the search page for people (static/index.html)
- GET  /images/{id}   → a gallery image by sample id (only images the index names)
Bad input is answered with a 4xx and a one-line `detail`, never a traceback.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations as types.
import base64
import hashlib
import hmac
import logging
import os
import re
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.serve.handle import DeploymentHandle

from entityclip import publish
from entityclip.config import PipelineConfig, ServeConfig, from_dict, to_dict
from entityclip.errors import ConfigError, EntityClipError, InputError, InputTooLarge, NotFound
from entityclip.paths import RunPaths, model_key
from entityclip.registry import MODEL_PATH, ModelRef, load_retriever, resolve
from entityclip.retrieval import Retriever, decode_base64
from entityclip.serving.explainer import Explainer, explainer_options
from entityclip.tracking import tracker_for

APP_NAME = "entityclip"
# The search page for people: plain HTML/JS/CSS, no build step, nothing from a CDN.
PAGE = (Path(__file__).parent / "static" / "index.html").read_text()
PUBLIC_PATHS = {"/", "/healthz"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}  # binds that need no API key  # open without an API key: the static page and the health check


def _inline_hashes(tag: str) -> str:
    """CSP source list allowing exactly the page's own inline <script> or <style> blocks."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", PAGE, flags=re.S)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)


# The page runs only its own script and style, talks only to this server, shows images from it
# (or blob: URLs it fetched with the API key), and cannot be framed.
PAGE_HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; script-src {_inline_hashes('script')}; "
                               f"style-src {_inline_hashes('style')}; img-src 'self' blob:; connect-src 'self'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
# A gallery image is shown, never run: no script even if its bytes look like HTML.
IMAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; sandbox", "X-Content-Type-Options": "nosniff"}


def api_key(serve_cfg: ServeConfig) -> str:
    """The API key replicas require, from the environment variable `serve.api_key_env` (never
    from the config, which MLflow logs); "" for none."""
    return os.environ.get(serve_cfg.api_key_env, "").strip() if serve_cfg.api_key_env else ""


class Query(BaseModel):
    # An unknown field is an error, not silently ignored: "tetx" must not search for nothing.
    model_config = ConfigDict(extra="forbid")


class TextQuery(Query):
    text: StrictStr
    k: StrictInt = 10
    explanation: StrictStr | None = None


class ImageQuery(Query):
    image_base64: StrictStr
    k: StrictInt = 10


class RegionQuery(Query):
    text: StrictStr
    sample_id: StrictStr


class ComposedQuery(Query):
    image_base64: StrictStr
    text: StrictStr
    k: StrictInt = 10
    explanation: StrictStr | None = None


class PairQuery(Query):
    text: StrictStr
    image_base64: StrictStr
    explanation: StrictStr | None = None


def max_body_bytes(max_image_bytes: int, max_text_chars: int) -> int:
    """The largest well-formed request: a base64 image, a text and its explanation, in JSON."""
    return (max_image_bytes + 2) // 3 * 4 + 8 * max_text_chars + 4096


api = FastAPI(title="EntityCLIP retrieval", docs_url=None, redoc_url=None, openapi_url=None)
logger = logging.getLogger("ray.serve")


@api.exception_handler(InputError)
async def _input_error(request: Request, exc: InputError) -> JSONResponse:
    status = 413 if isinstance(exc, InputTooLarge) else 404 if isinstance(exc, NotFound) else 400
    return JSONResponse({"detail": str(exc)}, status_code=status)


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    if any(e["type"] == "json_invalid" for e in exc.errors()):
        return JSONResponse({"detail": "request body is not valid JSON"}, status_code=422)
    problems = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()]
    return JSONResponse({"detail": "; ".join(problems)}, status_code=422)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = f"request body is over the limit of {request.app.state.max_body} bytes" if exc.status_code == 413 \
        else exc.detail
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)


@api.exception_handler(EntityClipError)
async def _server_error(request: Request, exc: EntityClipError) -> JSONResponse:
    # e.g. storage that cannot be read: one line that names no internal location.
    logger.warning("%s %s failed: %s", request.method, request.url.path, exc)
    return JSONResponse({"detail": "the server cannot answer this now (its storage or model failed); "
                                   "try again later"}, status_code=503)


class BodyLimit:
    """Refuses a body over `state.max_body` bytes: at once when its Content-Length says so, else
    when the bytes read pass the limit (a chunked body declares no length), so no more than the
    limit is ever held."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = scope["app"].state.max_body
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            response = JSONResponse({"detail": f"request body is {int(declared)} bytes; the limit is {limit}"},
                                    status_code=413)
            return await response(scope, receive, send)
        read = 0

        async def counted():
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > limit:  # FastAPI passes an HTTPException from here to its handler (_http_error)
                raise StarletteHTTPException(413)
            return message

        return await self.app(scope, counted, send)


class ApiKeyGate:
    """With `serve.api_key_env` set in the replicas' environment, every route but the health
    check and the (static) search page wants `Authorization: Bearer <key>`. Checked before the
    body is read."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["app"].state.api_key:
            return await self.app(scope, receive, send)
        key = scope["app"].state.api_key
        path, prefix = scope["path"], scope.get("root_path", "")  # Serve's route prefix is the root path
        if prefix and path.startswith(prefix):
            path = path[len(prefix):] or "/"
        if path not in PUBLIC_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                response = JSONResponse({"detail": "missing or wrong API key (send Authorization: Bearer <key>)"},
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


api.add_middleware(BodyLimit)
api.add_middleware(ApiKeyGate)  # added last, so it runs first: no body is read for a refused key


@serve.deployment
@serve.ingress(api)
class RetrievalServer:
    def __init__(self, config: dict, variant: str, explainer: DeploymentHandle | None = None,
                 model: dict | None = None):
        """`model`: a pinned registry version (registry.ModelRef fields) to load instead of the
        run root's checkpoint of `variant`."""
        cfg = from_dict(PipelineConfig, config)
        # Replicas share the machine's cores; one intra-op thread each avoids oversubscription.
        torch.set_num_threads(max(1, int(cfg.serve.cpus_per_replica)))
        if model:
            self.retriever = load_retriever(tracker_for(cfg), ModelRef(**model), cfg.serve, explain=explainer is None)
        else:
            self.retriever = Retriever.load(config=cfg, variant=variant, explain=explainer is None)
        self.explainer = explainer
        self.max_image_bytes = cfg.serve.max_image_bytes
        api.state.max_body = max_body_bytes(cfg.serve.max_image_bytes, cfg.serve.max_text_chars)
        api.state.api_key = api_key(cfg.serve)
        self._search_batch.set_max_batch_size(cfg.serve.max_batch_size)
        self._search_batch.set_batch_wait_timeout_s(cfg.serve.batch_wait_timeout_s)

    async def _explanation(self, text: str, given: str | None) -> str | None:
        if given is not None or self.explainer is None or not self.retriever.needs_explanations:
            return given
        return await self.explainer.explain.remote(text)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)  # set from the config in __init__
    async def _search_batch(self, queries: list[tuple[str, int, str | None]]) -> list[dict]:
        texts, ks, explanations = zip(*queries)
        return self.retriever.search_texts(list(texts), list(ks), list(explanations))

    @api.get("/healthz")
    def healthz(self) -> dict:
        return self.retriever.health()

    @api.get("/", response_class=HTMLResponse)
    def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE, headers=PAGE_HEADERS)

    @api.get("/images/{sample_id}")
    def image(self, sample_id: str) -> Response:
        data, media_type = self.retriever.gallery_image(sample_id)
        # Gallery images never change under an id within a deployed index.
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=86400", **IMAGE_HEADERS})

    @api.post("/search/text")
    async def search_text(self, query: TextQuery) -> dict:
        # Checked before batching, so that one bad query cannot fail the others in its batch.
        text, k = self.retriever.check_text(query.text), self.retriever.check_k(query.k)
        explanation = self.retriever.check_explanation(query.explanation)
        return await self._search_batch((text, k, await self._explanation(text, explanation)))

    @api.post("/search/image")
    def search_image(self, query: ImageQuery) -> dict:
        return self.retriever.search_image(decode_base64(query.image_base64, self.max_image_bytes), query.k)

    @api.post("/search/composed")
    async def search_composed(self, query: ComposedQuery) -> dict:
        """An image and a text saying what changes → images."""
        image = decode_base64(query.image_base64, self.max_image_bytes)
        text, k = self.retriever.check_text(query.text), self.retriever.check_k(query.k)
        explanation = self.retriever.check_explanation(query.explanation)
        return self.retriever.search_composed(image, text, k, await self._explanation(text, explanation))

    @api.post("/score")
    async def score(self, query: PairQuery) -> dict:
        image = decode_base64(query.image_base64, self.max_image_bytes)
        text = self.retriever.check_text(query.text)
        return self.retriever.score(text, image, await self._explanation(text, query.explanation))

    @api.post("/match/regions")
    def match_regions(self, query: RegionQuery) -> dict:
        """adamatch: the region of a gallery image each query word matched."""
        return self.retriever.word_regions(query.text, query.sample_id)


def check_servable(cfg: PipelineConfig, variant: str) -> ModelRef | None:
    """Fail in the caller's process, with one line, before any replica starts. A registry model
    is resolved here, once: every replica then loads the same pinned version."""
    if cfg.serve.model:
        tracker = tracker_for(cfg)
        ref = resolve(tracker, cfg.serve.model)
        if not tracker.has_artifact(ref.run_id, f"{MODEL_PATH}/artifacts/index"):
            raise ConfigError(f"{ref.uri} has no gallery index (trained with --no-eval?): it cannot search")
        return ref
    paths = RunPaths.for_config(cfg)
    publish.require(paths.checkpoint(variant), "model.json", "train")
    publish.require(paths.index(variant), "texts.faiss", "index")
    return None


def explainer_deployment(cfg: PipelineConfig) -> bool:
    """Whether queries are explained by a separate `Explainer` deployment rather than in each
    retrieval replica (`serve.explainer`). `auto`: only for an LLM that needs a GPU. On CPU the
    replicas run the LLM in-process (transformers on the same model, greedy, as vLLM decodes):
    measured on 2 cores, 29.6 against 10.9 req/s through one vLLM-on-CPU Explainer at one client,
    and 129.8 against 57.8 at 16 (README, "Online retrieval under load")."""
    if cfg.explain.engine == "knowledge" or cfg.serve.explainer == "in_process":
        return False
    return cfg.serve.explainer == "deployment" or cfg.explain.num_gpus_per_actor > 0


def build_app(cfg: PipelineConfig, variant: str | None = None):
    """(the Serve application, the registry version it serves or None). Without a registry
    model, it serves the run root's `variant` (default: cfg's variant at its training seed)."""
    variant = variant or model_key(cfg)
    ref = check_servable(cfg, variant)
    s, scaling = cfg.serve, cfg.serve.autoscaling
    explainer = None
    if explainer_deployment(cfg):
        explainer = Explainer.options(ray_actor_options=explainer_options(cfg)).bind(to_dict(cfg))
    return RetrievalServer.options(
        ray_actor_options={"num_cpus": s.cpus_per_replica},
        max_ongoing_requests=scaling.max_ongoing_requests,
        autoscaling_config={
            "min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s, "downscale_delay_s": scaling.downscale_delay_s,
            "look_back_period_s": scaling.look_back_period_s,
            # Deprecated in favour of the push-interval variables (runtime.SERVE_ENV), but still
            # what Serve checks look_back_period_s against: keep the two equal.
            "metrics_interval_s": float(os.environ.get("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", 10)),
        },
    ).bind(to_dict(cfg), variant, explainer, ref.__dict__ if ref else None), ref


def app_builder(args: dict):
    """For `serve run` / a Serve config file: args = {"config": path?, "overrides": [...]}."""
    from entityclip.config import load_config

    return build_app(load_config(args.get("config"), list(args.get("overrides", []))))[0]
