"""Ray Serve application: HTTP ingress → explainer → encoder replicas (autoscaled, batched) →
embedding index.

Endpoints (JSON):
- POST /search/text   {"text", "k"?, "explanation"?} → images ranked for the text
- POST /search/image  {"image_base64", "k"?}          → texts ranked for the image
- POST /score         {"text", "image_base64", "explanation"?} → similarity and P(match)
- GET  /healthz
Bad input is answered with a 4xx and a one-line `detail`, never a traceback.
"""

import base64
import binascii

import numpy as np
import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle

from entityclip.config import ExplainConfig, PipelineConfig, ServeConfig, to_dict
from entityclip.data.images import load_image_tensor
from entityclip.errors import InputError
from entityclip.explain.engines import ExplainRequest, make_engine
from entityclip.index import EmbeddingIndex
from entityclip.train.checkpoint import load_model


class TextQuery(BaseModel):
    text: str
    k: int = 10
    explanation: str | None = None


class ImageQuery(BaseModel):
    image_base64: str
    k: int = 10


class PairQuery(BaseModel):
    text: str
    image_base64: str
    explanation: str | None = None


@serve.deployment
class Explainer:
    def __init__(self, explain_cfg: dict, entities_uri: str):
        self.engine = make_engine(ExplainConfig(**explain_cfg), entities_uri)

    def explain(self, text: str) -> str:
        return self.engine.explain([ExplainRequest(text)])[0]


@serve.deployment
class Encoder:
    def __init__(self, checkpoint_uri: str, max_batch_size: int, batch_wait_timeout_s: float):
        torch.set_num_threads(1)
        self.model = load_model(checkpoint_uri)
        self.embed_texts.set_max_batch_size(max_batch_size)
        self.embed_texts.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.embed_images.set_max_batch_size(max_batch_size)
        self.embed_images.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def embed_texts(self, items: list[tuple[str, str]]) -> list[np.ndarray]:
        texts, explanations = zip(*items)
        return list(self.model.embed_texts(list(texts), list(explanations)).numpy())

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def embed_images(self, images: list[torch.Tensor]) -> list[np.ndarray]:
        return list(self.model.embed_images(torch.stack(images)).numpy())

    def match_probability(self, image: torch.Tensor, text: str, explanation: str) -> float:
        return float(self.model.match_probability(image.unsqueeze(0), [text], [explanation])[0])


api = FastAPI(title="EntityCLIP retrieval")


@serve.deployment
@serve.ingress(api)
class Retriever:
    def __init__(self, explainer: DeploymentHandle, encoder: DeploymentHandle, index_uri: str,
                 serve_cfg: dict, image_size: int):
        self.explainer, self.encoder = explainer, encoder
        self.index = EmbeddingIndex.load(index_uri)
        self.cfg = ServeConfig(**serve_cfg)
        self.image_size = image_size

    def _text(self, text: str) -> str:
        text = text.strip()
        if not text:
            raise HTTPException(400, "text is empty")
        if len(text) > self.cfg.max_text_chars:
            raise HTTPException(413, f"text is {len(text)} characters; the limit is {self.cfg.max_text_chars}")
        return text

    def _k(self, k: int) -> int:
        if not 1 <= k <= 1000:
            raise HTTPException(400, "k must be between 1 and 1000")
        return k

    def _image(self, image_base64: str) -> torch.Tensor:
        try:
            data = base64.b64decode(image_base64, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(400, "image_base64 is not valid base64") from None
        if len(data) > self.cfg.max_image_bytes:
            raise HTTPException(413, f"image is {len(data)} bytes; the limit is {self.cfg.max_image_bytes}")
        try:
            return load_image_tensor(data, self.image_size, max_bytes=self.cfg.max_image_bytes)
        except InputError as exc:
            raise HTTPException(400, str(exc)) from None

    async def _explanation(self, text: str, given: str | None) -> str:
        return given if given is not None else await self.explainer.explain.remote(text)

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "index_size": len(self.index)}

    @api.post("/search/text")
    async def search_text(self, query: TextQuery) -> dict:
        text, k = self._text(query.text), self._k(query.k)
        explanation = await self._explanation(text, query.explanation)
        embedding = await self.encoder.embed_texts.remote((text, explanation))
        hits = self.index.search(embedding, "images", k)
        return {"explanation": explanation, "results": [h.__dict__ for h in hits]}

    @api.post("/search/image")
    async def search_image(self, query: ImageQuery) -> dict:
        image, k = self._image(query.image_base64), self._k(query.k)
        embedding = await self.encoder.embed_images.remote(image)
        return {"results": [h.__dict__ for h in self.index.search(embedding, "texts", k)]}

    @api.post("/score")
    async def score(self, query: PairQuery) -> dict:
        text, image = self._text(query.text), self._image(query.image_base64)
        explanation = await self._explanation(text, query.explanation)
        t = await self.encoder.embed_texts.remote((text, explanation))
        i = await self.encoder.embed_images.remote(image)
        prob = await self.encoder.match_probability.remote(image, text, explanation)
        return {"similarity": float(np.dot(t, i)), "match_probability": None if np.isnan(prob) else prob,
                "explanation": explanation}


def build_app(cfg: PipelineConfig, checkpoint_uri: str, index_uri: str, entities_uri: str):
    s = cfg.serve
    # Read once here so that a bad checkpoint fails at deploy time, in the caller's process.
    image_size = load_model(checkpoint_uri).image_size
    explainer = Explainer.options(ray_actor_options={"num_cpus": 0.1}).bind(to_dict(cfg.explain), entities_uri)
    encoder = Encoder.options(
        ray_actor_options={"num_cpus": 0.25},
        autoscaling_config={"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                            "target_ongoing_requests": 4},
    ).bind(checkpoint_uri, s.max_batch_size, s.batch_wait_timeout_s)
    return Retriever.options(ray_actor_options={"num_cpus": 0.1}).bind(
        explainer, encoder, index_uri, to_dict(s), image_size)


def app_builder(args: dict):
    """For `serve run` / a Serve config file: args = {"config": path?, "overrides": [...]}."""
    from entityclip.config import load_config
    from entityclip.pipeline import RunPaths

    cfg = load_config(args.get("config"), list(args.get("overrides", [])))
    paths = RunPaths.for_config(cfg)
    return build_app(cfg, paths.checkpoint(cfg.model.variant), paths.index(cfg.model.variant), paths.entities)

