"""The Ray Serve app over real HTTP, with the checkpoint and index of the session's run."""

import base64
import json
import random

import pytest
import requests

from entityclip import storage


@pytest.fixture(scope="module")
def url(served_url):
    return served_url


@pytest.fixture(scope="module")
def sample(unseen_sample):
    return {**unseen_sample, "image_base64": base64.b64encode(storage.read_bytes(unseen_sample["image_uri"])).decode()}


def test_health_reports_the_index_and_the_model(url):
    body = requests.get(f"{url}/healthz", timeout=30).json()
    # 8 entities x 6, 2 minimal pairs of 2 kinds, and 4 composed queries per entity
    assert body["status"] == "ok" and body["index_size"] == 88
    assert body["model"]["variant"] == "entityclip"
    assert body["model"]["word_regions"] is False  # no adaptive patches: the page offers no regions button


def test_http_answers_are_the_in_process_retrievers_answers(url, sample, trained_run):
    from entityclip import Retriever

    retriever = Retriever.load(str(trained_run["root"]), config=trained_run["cfg"])
    body = requests.post(f"{url}/search/text", json={"text": sample["text"], "k": 5}, timeout=60).json()
    assert body == json.loads(json.dumps(retriever.search_text(sample["text"], 5)))
    body = requests.post(f"{url}/search/image", json={"image_base64": sample["image_base64"], "k": 56}, timeout=60).json()
    assert sample["sample_id"] in [hit["sample_id"] for hit in body["results"]]


def test_a_composed_query_over_http_is_the_in_process_retrievers_answer(url, sample, trained_run):
    from entityclip import Retriever

    retriever = Retriever.load(str(trained_run["root"]), config=trained_run["cfg"])
    text = "this emblem, but on a sandy beach."
    body = requests.post(f"{url}/search/composed", json={"image_base64": sample["image_base64"], "text": text, "k": 5},
                         timeout=60).json()
    image = storage.read_bytes(sample["image_uri"])
    assert body == json.loads(json.dumps(retriever.search_composed(image, text, 5)))
    assert len(body["results"]) == 5 and body["explanation"]  # entityclip explains the text it composes


def test_pair_scoring_returns_similarity_and_match_probability(url, sample):
    body = requests.post(f"{url}/score", json={"text": sample["text"], "image_base64": sample["image_base64"]}, timeout=60).json()
    assert -1.0 <= body["similarity"] <= 1.0
    assert 0.0 < body["match_probability"] < 1.0


def test_concurrent_queries_are_all_answered(url, sample):
    from concurrent.futures import ThreadPoolExecutor

    def ask(i):
        return requests.post(f"{url}/search/text", json={"text": f"{sample['text']} {i}", "k": 3}, timeout=60).status_code

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, range(32))) == [200] * 32


@pytest.mark.parametrize("path, payload, status, detail", [
    ("/search/text", {"text": "   "}, 400, "text is empty"),
    ("/search/text", {"text": "x" * 5000}, 413, "limit is 1000"),
    ("/search/text", {"text": "ok", "k": 0}, 400, "k must be"),
    ("/search/text", {"text": "ok", "k": 10**30}, 400, "k must be"),
    ("/search/text", {"text": "ok", "k": "5"}, 422, "k: Input should be a valid integer"),
    ("/search/text", {"query": "wrong field"}, 422, "text: Field required"),
    ("/search/text", ["a", "list"], 422, "Input should be a valid dictionary"),
    ("/search/image", {"image_base64": "***"}, 400, "not valid base64"),
    ("/search/image", {"image_base64": "iVBORw0KGgo"}, 400, "not valid base64"),
    ("/search/image", {"image_base64": base64.b64encode(b"plain text").decode()}, 400, "not a recognised image"),
    ("/search/image", {"image_base64": base64.b64encode(b"\x00" * 9_000_000).decode()}, 413, "limit is"),
    ("/score", {"text": "only text"}, 422, "image_base64: Field required"),
    ("/search/composed", {"text": "this emblem, but on a sandy beach."}, 422, "image_base64: Field required"),
    ("/search/composed", {"image_base64": "aGVsbG8=", "text": " "}, 400, "text is empty"),
    ("/search/composed", {"image_base64": base64.b64encode(b"plain text").decode(), "text": "on a beach"}, 400,
     "not a recognised image"),
    ("/match/regions", {"text": "Velmora Rovers", "sample_id": "e0000-000"}, 400, "has no adaptive patches"),
])
def test_bad_requests_get_a_clear_4xx(url, path, payload, status, detail):
    response = requests.post(f"{url}{path}", json=payload, timeout=60)
    assert response.status_code == status
    assert detail in response.json()["detail"]


def fuzz_requests(rng: random.Random) -> list[tuple[str, str, bytes]]:
    """(method, path, body) malformed in every way a client can get wrong."""
    good = json.dumps({"text": "Velmora Rovers lift the cup", "image_base64": "aGVsbG8=", "k": 3})
    cases = []
    for _ in range(90):
        cases.append(("POST", rng.choice(["/search/text", "/search/image", "/score", "/search/composed"]),
                      rng.randbytes(rng.randint(1, 400))))
    for value in [None, 1, 1.5, True, [], {}, "x", -1, 10**12]:
        for field in ["text", "k", "image_base64", "explanation"]:
            cases.append(("POST", rng.choice(["/search/text", "/search/image", "/score"]),
                          json.dumps({"text": "ok", "image_base64": "aGVsbG8=", field: value}).encode()))
    for cut in range(1, 40):
        cases.append(("POST", "/search/image", json.dumps({"image_base64": base64.b64encode(b"\x89PNG" * 9).decode()[:cut]}).encode()))
    cases += [("POST", "/search/text", b""), ("POST", "/score", b"")]
    cases += [("POST", "/search/text", good[:n].encode()) for n in range(5, 60, 2)]
    cases += [("GET", path, b"") for path in ["/nope", "/search/text/..", "/../etc/passwd", "/%2e%2e/x", "/search"]]
    cases += [("DELETE", "/search/text", b""), ("PUT", "/score", good.encode())]
    cases.append(("POST", "/search/image", b"{" + b" " * 50_000_000 + b"}"))
    return cases


def test_two_hundred_malformed_requests_get_one_line_4xx_and_health_still_answers(url):
    cases = fuzz_requests(random.Random(0))
    assert len(cases) >= 200
    for method, path, body in cases:
        response = requests.request(method, f"{url}{path}", data=body, timeout=120,
                                    headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, (method, path, body[:80], response.status_code, response.text[:200])
        detail = response.json()["detail"]
        assert isinstance(detail, str) and detail and "\n" not in detail, (path, detail)
    assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"


def raw_get(url: str, path: str) -> tuple[int, bytes, dict]:
    """GET with the path sent exactly as given (requests would normalise `..` away)."""
    import http.client
    from urllib.parse import urlparse

    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read(), dict(response.getheaders())


def test_the_search_page_is_served_at_the_root(url):
    status, body, headers = raw_get(url, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"EntityCLIP search" in body
    assert b"<script src" not in body and b"<link" not in body  # self-contained: nothing from a CDN


def test_gallery_images_are_served_by_id_with_cache_headers(url, sample):
    status, body, headers = raw_get(url, f"/images/{sample['sample_id']}")
    assert status == 200 and body == storage.read_bytes(sample["image_uri"])
    assert headers["content-type"] == "image/png" and "max-age" in headers["cache-control"]


@pytest.mark.parametrize("path", ["/images/e9999-000", "/images/..", "/images/../healthz", "/images/..%2F..%2Fetc%2Fpasswd",
                                  "/images/%2Fetc%2Fpasswd", "/images/data%2Fimages%2Fe0000-000.png", "/images/"])
def test_anything_but_a_gallery_id_is_a_404(url, path):
    status, body, _ = raw_get(url, path)
    assert status == 404, (path, body[:200])


@pytest.mark.parametrize("sets, deployment", [
    (["explain.engine=knowledge"], False),
    (["explain.engine=vllm"], False),  # an LLM on CPU: each replica explains in-process
    (["explain.engine=vllm", "explain.num_gpus_per_actor=1"], True),  # an LLM with its GPU
    (["explain.engine=hf", "serve.explainer=deployment"], True),
    (["explain.engine=vllm", "explain.num_gpus_per_actor=1", "serve.explainer=in_process"], False),
    (["explain.engine=knowledge", "serve.explainer=deployment"], False),  # nothing to deploy
])
def test_an_explainer_deployment_serves_only_an_llm_that_needs_a_gpu_unless_asked(sets, deployment):
    from entityclip.config import load_config
    from entityclip.serving.app import explainer_deployment

    assert explainer_deployment(load_config(None, sets)) is deployment


def test_an_unknown_explainer_placement_is_a_config_error():
    from entityclip.config import load_config
    from entityclip.errors import ConfigError
    from entityclip.serving.app import explainer_deployment

    with pytest.raises(ConfigError, match="serve.explainer"):
        explainer_deployment(load_config(None, ["explain.engine=vllm", "serve.explainer=gpu"]))
