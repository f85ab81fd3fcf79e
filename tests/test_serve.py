"""The Ray Serve app over real HTTP, with the checkpoint and index of the session's run."""

import base64

import pytest
import requests

from entityclip import storage
from entityclip.pipeline import start_serving, with_variant
from tests.conftest import free_port


@pytest.fixture(scope="module")
def url(trained_run):
    from ray import serve

    cfg = trained_run["cfg"]
    cfg.serve.port = free_port()
    base = start_serving(with_variant(cfg, "entityclip"))
    yield base
    serve.delete("entityclip")


@pytest.fixture(scope="module")
def sample(trained_run):
    rows = storage.read_parquet(storage.join(str(trained_run["root"]), "data", "samples.parquet")).to_pylist()
    s = next(r for r in rows if r["split"] == "test_unseen")
    return {**s, "image_base64": base64.b64encode(storage.read_bytes(s["image_uri"])).decode()}


def test_health_reports_the_index(url):
    body = requests.get(f"{url}/healthz", timeout=30).json()
    assert body["status"] == "ok" and body["index_size"] == 48


def test_text_to_image_search_explains_the_query_and_ranks_k_images(url, sample, trained_run):
    body = requests.post(f"{url}/search/text", json={"text": sample["text"], "k": 5}, timeout=60).json()
    entities = storage.read_parquet(storage.join(str(trained_run["root"]), "data", "entities.parquet")).to_pylist()
    record = next(e for e in entities if e["name"] == sample["entities"][0])
    assert f"{record['primary']} {record['shape']}" in body["explanation"]
    scores = [hit["score"] for hit in body["results"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    assert all(hit["image_uri"].endswith(".png") for hit in body["results"])


def test_image_to_text_search_finds_the_image_itself_in_the_gallery(url, sample):
    body = requests.post(f"{url}/search/image", json={"image_base64": sample["image_base64"], "k": 48}, timeout=60).json()
    assert sample["sample_id"] in [hit["sample_id"] for hit in body["results"]]


def test_pair_scoring_returns_similarity_and_match_probability(url, sample):
    body = requests.post(f"{url}/score", json={"text": sample["text"], "image_base64": sample["image_base64"]}, timeout=60).json()
    assert -1.0 <= body["similarity"] <= 1.0
    assert 0.0 < body["match_probability"] < 1.0


def test_concurrent_queries_are_all_answered(url, sample):
    from concurrent.futures import ThreadPoolExecutor

    def ask(i):
        return requests.post(f"{url}/search/text", json={"text": f"{sample['text']} {i}", "k": 3}, timeout=60).status_code

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, range(16))) == [200] * 16


@pytest.mark.parametrize("path, payload, status, detail", [
    ("/search/text", {"text": "   "}, 400, "text is empty"),
    ("/search/text", {"text": "x" * 5000}, 413, "limit is 1000"),
    ("/search/text", {"text": "ok", "k": 0}, 400, "k must be"),
    ("/search/text", {"query": "wrong field"}, 422, "text"),
    ("/search/image", {"image_base64": "***"}, 400, "not valid base64"),
    ("/search/image", {"image_base64": base64.b64encode(b"plain text").decode()}, 400, "not a recognised image"),
    ("/search/image", {"image_base64": base64.b64encode(b"\x00" * 9_000_000).decode()}, 413, "limit is"),
    ("/score", {"text": "only text"}, 422, "image_base64"),
])
def test_bad_requests_get_a_clear_4xx(url, path, payload, status, detail):
    response = requests.post(f"{url}{path}", json=payload, timeout=60)
    assert response.status_code == status
    assert detail in str(response.json()["detail"])


def test_malformed_json_is_a_422_not_a_500(url):
    response = requests.post(f"{url}/search/text", data="{not json", headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 422
