"""`Retriever`, the in-process retrieval API that the Serve app wraps, on the session's run."""

import io

import pytest
from PIL import Image

from entityclip import Retriever, storage
from entityclip.errors import InputError, InputTooLarge
from entityclip.explain.engines import KnowledgeEngine
from entityclip.retrieval import ExplanationCache


@pytest.fixture(scope="module")
def retriever(trained_run):
    return Retriever.load(str(trained_run["root"]), config=trained_run["cfg"])


@pytest.fixture(scope="module")
def sample(unseen_sample):
    return {**unseen_sample, "image_bytes": storage.read_bytes(unseen_sample["image_uri"])}


def test_text_search_explains_the_query_and_ranks_k_images(retriever, sample, trained_run):
    body = retriever.search_text(sample["text"], k=5)
    entities = storage.read_parquet(storage.join(str(trained_run["root"]), "data", "entities.parquet")).to_pylist()
    record = next(e for e in entities if e["name"] == sample["entities"][0])
    assert f"{record['primary']} {record['shape']}" in body["explanation"]
    scores = [hit["score"] for hit in body["results"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    assert body["model"]["variant"] == "entityclip"


def test_a_run_loaded_by_its_root_alone_explains_queries_with_the_engine_that_explained_its_data(
        retriever, sample, trained_run):
    by_root = Retriever.load(str(trained_run["root"]))  # the default config says vllm; this run used knowledge
    assert by_root.search_text(sample["text"], k=3) == retriever.search_text(sample["text"], k=3)


def test_a_batch_of_text_queries_answers_each_as_if_alone(retriever, sample):
    texts = [sample["text"], "Velmora Rovers lift the cup", sample["text"] + " again"]
    batch = retriever.search_texts(texts, [3, 7, 1])
    alone = [retriever.search_text(t, k) for t, k in zip(texts, [3, 7, 1])]
    assert [[h["sample_id"] for h in b["results"]] for b in batch] == [[h["sample_id"] for h in a["results"]] for a in alone]
    assert [len(b["results"]) for b in batch] == [3, 7, 1]


def test_image_search_takes_bytes_or_a_pil_image_and_finds_the_image_itself(retriever, sample):
    by_bytes = retriever.search_image(sample["image_bytes"], k=48)
    by_pil = retriever.search_image(Image.open(io.BytesIO(sample["image_bytes"])), k=48)
    assert sample["sample_id"] in [hit["sample_id"] for hit in by_bytes["results"]]
    assert [h["sample_id"] for h in by_bytes["results"]] == [h["sample_id"] for h in by_pil["results"]]


def test_score_gives_similarity_and_match_probability(retriever, sample):
    body = retriever.score(sample["text"], sample["image_bytes"])
    assert -1.0 <= body["similarity"] <= 1.0
    assert 0.0 < body["match_probability"] < 1.0


def test_a_retriever_without_an_engine_searches_with_given_explanations(sample, trained_run):
    # Serve's ingress, when an Explainer deployment writes the explanations
    bare = Retriever.load(str(trained_run["root"]), config=trained_run["cfg"], explain=False)
    assert bare.search_text(sample["text"], k=2, explanation="A red circle.")["explanation"] == "A red circle."
    with pytest.raises(InputError, match="no explanation engine"):
        bare.search_text(sample["text"], k=2)


def test_a_given_explanation_is_used_instead_of_the_engine(retriever, sample):
    body = retriever.search_text(sample["text"], k=2, explanation="A team whose emblem is a red circle.")
    assert body["explanation"] == "A team whose emblem is a red circle."


@pytest.mark.parametrize("call, error, message", [
    (lambda r: r.search_text("   "), InputError, "text is empty"),
    (lambda r: r.search_text("x" * 5000), InputTooLarge, "limit is 1000"),
    (lambda r: r.search_text("ok", k=0), InputError, "k must be"),
    (lambda r: r.search_text("ok", k=True), InputError, "k must be"),
    (lambda r: r.search_text("ok", explanation="e" * 5000), InputTooLarge, "explanation is 5000"),
    (lambda r: r.search_image(b"plain text"), InputError, "not a recognised image"),
    (lambda r: r.search_image(b""), InputError, "empty"),
    (lambda r: r.search_image(b"\x00" * 9_000_000), InputTooLarge, "limit is"),
    (lambda r: r.search_image("a path, not bytes"), InputError, "bytes or a PIL image"),
])
def test_bad_input_raises_a_one_line_input_error(retriever, call, error, message):
    with pytest.raises(error, match=message) as info:
        call(retriever)
    assert "\n" not in str(info.value)


class CountingEngine(KnowledgeEngine):
    def __init__(self, entities_uri):
        super().__init__(entities_uri)
        self.explained = 0

    def explain(self, requests):
        self.explained += len(requests)
        return super().explain(requests)


def test_explanations_are_cached_and_the_cache_is_bounded(trained_run):
    engine = CountingEngine(storage.join(str(trained_run["root"]), "data", "entities.parquet"))
    cache = ExplanationCache(engine, size=2)
    first = cache.explain(["a text", "b text", "a text"])
    assert first[0] == first[2] and engine.explained == 2
    cache.explain(["a text", "b text"])
    assert engine.explained == 2  # both served from the cache
    cache.explain(["c text"])  # evicts the least recently used ("a text")
    cache.explain(["b text", "a text"])
    assert engine.explained == 4
