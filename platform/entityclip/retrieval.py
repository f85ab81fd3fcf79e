"""`Retriever`: the one implementation of online retrieval, in-process or behind Ray Serve.

    from entityclip import Retriever
    r = Retriever.load("runs/default")              # or s3://bucket/prefix
    r.search_text("Velmora Rovers lift the cup", k=5)
    r.search_image(open("photo.png", "rb").read(), k=5)
    r.score("Velmora Rovers lift the cup", image_bytes)
    r.search_composed(image_bytes, "this emblem, but on a sandy beach", k=5)
    Retriever.load("runs/default", "entityclip", rerank="itm")  # GI-ITM re-ranks the top 20

Each method returns the plain dict the HTTP API answers with. Bad input raises `InputError`
(`InputTooLarge` for sizes over a limit) with a one-line message.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from entityclip import storage
from entityclip.config import PipelineConfig, ServeConfig, StorageConfig, load_config
from entityclip.data.images import load_image_tensor, to_tensor
from entityclip.errors import InputError, InputTooLarge, NotFound, StorageError
from entityclip.explain.cache import ExplanationCache
from entityclip.explain.engines import engine_of_run, in_process, make_engine, run_explain_config
from entityclip.index import EmbeddingIndex
from entityclip.models import EntityCLIP
from entityclip.models.adapatch import word_matches
from entityclip.models.backbone import word_positions
from entityclip.paths import RunPaths
from entityclip.rerank import Reranker
from entityclip.models.checkpoint import load_model


def decode_base64(data: str, max_bytes: int) -> bytes:
    # base64 is 4/3 of its bytes: refuse an oversized image before decoding it.
    if len(data) > (max_bytes + 2) // 3 * 4:
        raise InputTooLarge(f"image is over {max_bytes} bytes; the limit is {max_bytes}")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("image_base64 is not valid base64") from None


@dataclass(frozen=True)
class Limits:
    max_k: int = 1000
    max_text_chars: int = 1000
    max_image_bytes: int = 8_000_000
    max_image_pixels: int = 16_000_000
    image_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")

    @classmethod
    def from_config(cls, serve_cfg: ServeConfig) -> "Limits":
        return cls(serve_cfg.max_k, serve_cfg.max_text_chars, serve_cfg.max_image_bytes, serve_cfg.max_image_pixels, tuple(serve_cfg.image_formats))


class Retriever:
    """A trained matcher, its gallery index, its re-ranker where `serve.rerank` asks for one, and
    (unless explanations come from elsewhere) an explanation engine with an LRU cache.
    Thread-safe: inference only, under no_grad."""

    def __init__(self, model: EntityCLIP, index: EmbeddingIndex | None, explainer: ExplanationCache | None,
                 limits: Limits, info: dict, reranker: Reranker | None = None):
        self.model, self._index, self.explainer, self.limits = model, index, explainer, limits
        self.reranker = reranker
        self.info = {**info, **reranker.info} if reranker else info

    @property
    def index(self) -> EmbeddingIndex:
        if self._index is None:
            raise NotFound(f"model {self.info.get('variant')} was loaded without a gallery index: it embeds, not searches")
        return self._index

    @classmethod
    def load(cls, root: str | None = None, variant: str = "entityclip", config: PipelineConfig | None = None,
             explain: bool = True, rerank: str | None = None) -> "Retriever":
        """The run at `root` (default: `config`'s storage root). `explain=False` leaves the
        explanation engine out: callers then pass each query's explanation (Serve does, when
        the engine runs in its own deployment). `rerank` overrides `serve.rerank` (rerank.py)."""
        cfg = config or load_config()
        if root is not None:
            cfg = replace(cfg, storage=StorageConfig(root))
        if rerank is not None:
            cfg = replace(cfg, serve=replace(cfg.serve, rerank=rerank))
        paths = RunPaths.for_config(cfg)
        if config is None:  # explain queries with the engine that explained the run's data
            cfg = replace(cfg, explain=engine_of_run(paths.explanations, cfg.explain))
        checkpoint = paths.checkpoint(variant)
        # `info` is in every answer: what model answers, never where it is stored.
        return cls.from_parts(cfg, checkpoint, paths.index(variant), paths.entities, {"variant": variant}, explain)

    @classmethod
    def from_parts(cls, cfg: PipelineConfig, checkpoint: str, index: str | None, entities: str,
                   info: dict, explain: bool = True) -> "Retriever":
        """A checkpoint, optionally its gallery index (without one, only embedding works), and
        the explanation engine of `cfg.explain` (`entities`: the knowledge engine's world)."""
        model = load_model(checkpoint)
        explainer = ExplanationCache(make_engine(in_process(run_explain_config(cfg)), entities),
                                     cfg.serve.explain_cache_size) \
            if explain and model.uses_explanations else None
        gallery = EmbeddingIndex.load(index) if index else None
        reranker = Reranker.for_model(model, gallery, cfg.serve)
        # What the page may offer: it reads capabilities, never variant names.
        info = {**info, "word_regions": model.spec.adaptive_patches}
        return cls(model, gallery, explainer, Limits.from_config(cfg.serve), info, reranker)

    @property
    def needs_explanations(self) -> bool:
        return self.model.uses_explanations

    # --- input checks: one line saying what is wrong ---------------------------------------
    def check_text(self, text: str) -> str:
        if not isinstance(text, str):
            raise InputError("text must be a string")
        text = text.strip()
        if not text:
            raise InputError("text is empty")
        if len(text) > self.limits.max_text_chars:
            raise InputTooLarge(f"text is {len(text)} characters; the limit is {self.limits.max_text_chars}")
        return text

    def check_explanation(self, explanation: str | None) -> str | None:
        """A caller's own explanation: None (explain the text here) or a string within limits."""
        if explanation is None:
            return None
        if not isinstance(explanation, str):
            raise InputError("explanation must be a string")
        if len(explanation) > self.limits.max_text_chars:
            raise InputTooLarge(f"explanation is {len(explanation)} characters; the limit is {self.limits.max_text_chars}")
        return explanation

    def check_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.limits.max_k:
            raise InputError(f"k must be an integer between 1 and {self.limits.max_k}")
        return k

    def image_tensor(self, image: bytes | Image.Image) -> torch.Tensor:
        if isinstance(image, Image.Image):
            return to_tensor(image.convert("RGB"), self.model.image_size)
        if not isinstance(image, (bytes, bytearray)):
            raise InputError("image must be bytes or a PIL image")
        return load_image_tensor(bytes(image), self.model.image_size, max_bytes=self.limits.max_image_bytes,
                                 max_pixels=self.limits.max_image_pixels, formats=self.limits.image_formats)

    # --- retrieval --------------------------------------------------------------------------
    def explain(self, texts: list[str]) -> list[str]:
        """Explanations for already-checked texts ("" for variants that read none)."""
        if not self.needs_explanations:
            return [""] * len(texts)
        if self.explainer is None:
            raise InputError("this retriever has no explanation engine: pass each query's explanation")
        return self.explainer.explain(texts)

    def search_texts(self, texts: list[str], ks: list[int], explanations: list[str | None] | None = None) -> list[dict]:
        """Text → image search for a batch of queries, encoded together."""
        texts = [self.check_text(t) for t in texts]
        ks = [self.check_k(k) for k in ks]
        given = [self.check_explanation(e) for e in explanations] if explanations is not None else [None] * len(texts)
        features, given = self._text_features(texts, given)
        with torch.no_grad():
            embeddings = self.model.text_embedding(features).numpy()
        rerank = (lambda q, c, s: self.reranker.score_images(features, q, c, s)) if self.reranker else None
        hits = self.index.search(embeddings, "images", max(ks), rerank, self.reranker.k if rerank else 0)
        return [{"explanation": e, "results": [h.answer() for h in row[:k]], "model": self.info}
                for e, row, k in zip(given, hits, ks)]

    def embed_texts(self, texts: list[str], explanations: list[str | None] | None = None) -> tuple[np.ndarray, list[str]]:
        """Unit-norm retrieval embeddings [N, D] of checked texts, and the explanations they
        read (given ones kept, missing ones written by the engine)."""
        features, given = self._text_features(texts, explanations)
        with torch.no_grad():
            return self.model.text_embedding(features).numpy(), given

    def _text_features(self, texts: list[str], explanations: list[str | None] | None) -> tuple:
        given = list(explanations) if explanations is not None else [None] * len(texts)
        todo = [i for i, e in enumerate(given) if e is None]
        if todo:  # a retriever without an engine embeds texts whose explanations are given
            for i, e in zip(todo, self.explain([texts[i] for i in todo])):
                given[i] = e
        return self.model.text_features(texts, given), given

    def embed_images(self, images: list[bytes | Image.Image]) -> np.ndarray:
        """Unit-norm retrieval embeddings [N, D] of images (bytes or PIL)."""
        return self.model.embed_images(torch.stack([self.image_tensor(i) for i in images])).numpy()

    def search_text(self, text: str, k: int = 10, explanation: str | None = None) -> dict:
        return self.search_texts([text], [k], [explanation])[0]

    def search_image(self, image: bytes | Image.Image, k: int = 10) -> dict:
        """Image → text search."""
        k = self.check_k(k)
        with torch.no_grad():
            features = self.model.encode_images(self.image_tensor(image).unsqueeze(0))
            embedding = self.model.image_embedding(features).numpy()
        rerank = (lambda q, c, s: self.reranker.score_texts(features, q, c, s)) if self.reranker else None
        hits = self.index.search(embedding, "texts", k, rerank, self.reranker.k if rerank else 0)
        return {"results": [h.answer() for h in hits[0]], "model": self.info}

    def search_composed(self, image: bytes | Image.Image, text: str, k: int = 10, explanation: str | None = None) -> dict:
        """Composed query → images: gallery images like `image`, changed as `text` says
        (`EntityCLIP.composed_embedding`: vista's encoder, or any other variant's sum of its two
        embeddings). First stage only: a re-ranker scores (image, text) pairs, and a composed
        query is not one."""
        text, k = self.check_text(text), self.check_k(k)
        features, given = self._text_features([text], [self.check_explanation(explanation)])
        with torch.no_grad():
            image_features = self.model.encode_images(self.image_tensor(image).unsqueeze(0))
            embedding = self.model.composed_embedding(image_features, features).numpy()
        hits = self.index.search(embedding, "images", k)
        return {"explanation": given[0], "results": [h.answer() for h in hits[0]], "model": self.info}

    def score(self, text: str, image: bytes | Image.Image, explanation: str | None = None) -> dict:
        """Similarity of the retrieval embeddings and, where the variant has one, P(match)
        from the GI-ITM head."""
        text, explanation = self.check_text(text), self.check_explanation(explanation)
        pixels = self.image_tensor(image).unsqueeze(0)
        explanation = self.explain([text])[0] if explanation is None else explanation
        t = self.model.embed_texts([text], [explanation]).numpy()[0]
        i = self.model.embed_images(pixels).numpy()[0]
        prob = float(self.model.match_probability(pixels, [text], [explanation])[0])
        return {"similarity": float(np.dot(t, i)), "match_probability": None if np.isnan(prob) else prob,
                "explanation": explanation, "model": self.info}

    def word_regions(self, text: str, sample_id: str) -> dict:
        """Which region of gallery image `sample_id` each word of `text` matched (adamatch): per
        word, the box of its best adaptive patch ([x0, y0, x1, y1], fractions of the image side)
        and their cosine similarity."""
        if not self.model.spec.adaptive_patches:
            raise InputError(f"variant {self.model.model_cfg.variant} has no adaptive patches to explain a match "
                             "with (adamatch has)")
        text = self.check_text(text)
        data, _ = self.gallery_image(sample_id)
        with torch.no_grad():
            image = self.model.encode_images(self.image_tensor(data).unsqueeze(0))
            txt = self.model.text_features([text], [""])  # adamatch reads no explanation
        words = word_positions(self.model.tokenizer, txt.ids[0], int(txt.eot_index[0]))
        if not words:
            return {"sample_id": sample_id, "words": [], "model": self.info}
        features = torch.stack([txt.tokens[0, positions].mean(dim=0) for _, positions in words])
        patch, cosine = word_matches(image.tokens[0, 1:], features)
        return {"sample_id": sample_id, "model": self.info,
                "words": [{"word": word, "box": [round(v, 4) for v in image.regions[0, p].tolist()],
                           "similarity": round(float(c), 4)} for (word, _), p, c in zip(words, patch, cosine)]}

    def gallery_image(self, sample_id: str) -> tuple[bytes, str]:
        """(bytes, media type) of a gallery image, looked up by its id: only files the index
        names are ever read, whatever the id says."""
        uri = self._index.image_uri(sample_id) if self._index is not None and isinstance(sample_id, str) else None
        if uri is None:
            raise NotFound(f"no gallery image {sample_id!r}")
        try:
            data = storage.read_bytes(uri)
        except StorageError:  # the index names it, but storage lost it: say so without the path
            raise NotFound(f"gallery image {sample_id!r} cannot be read from the gallery's storage") from None
        return data, mimetypes.guess_type(uri)[0] or "application/octet-stream"

    def health(self) -> dict:
        return {"status": "ok", "index_size": len(self._index) if self._index else 0, "model": self.info}
