"""The Serve app against hostile input over real HTTP: bodies over the limit however they are
sent, images that would decode to gigabytes, formats outside the allow-list, answers that name
no internal location, browser-facing headers, and an API key where one is set."""

import base64
import http.client
import io
import json
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests
from PIL import Image

from entityclip import storage
from entityclip.serving.client import ServeClient, ServeError


@pytest.fixture(scope="module")
def url(served_url):
    return served_url


def replica_rss_mb() -> float:
    from ray.util.state import list_actors

    pids = [a.pid for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if a.class_name.startswith("ServeReplica:entityclip:RetrievalServer")]
    return sum(rss_mb(pid) for pid in pids)


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def post_chunked(url: str, path: str, total_bytes: int, chunk: int = 1 << 16) -> tuple[int, dict, float]:
    """POST `total_bytes` with Transfer-Encoding: chunked (no Content-Length), stopping when the
    server answers or closes; (status, JSON answer, seconds)."""
    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    start = time.time()
    conn.putrequest("POST", path)
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    piece = b'{"image_base64": "' + b"A" * (chunk - 18)
    sent = 0
    try:
        while sent < total_bytes:
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
            piece = b"A" * chunk
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed before the body ended: read its answer
    response = conn.getresponse()
    return response.status, json.loads(response.read()), time.time() - start


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of `width` x `height` zeros: a few KB that decode to width*height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    rows = zlib.compress(b"\x00" * ((width + 7) // 8 + 1) * height, 9)
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_a_50_mb_chunked_body_is_refused_on_the_bytes_read_quickly_with_memory_flat(url):
    before = replica_rss_mb()
    for _ in range(3):
        status, answer, seconds = post_chunked(url, "/search/image", 50_000_000)
        assert status == 413 and "over the limit" in answer["detail"] and "\n" not in answer["detail"]
        assert seconds < 15
    assert replica_rss_mb() - before < 100  # the 150 MB sent was never held
    assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"


@pytest.mark.parametrize("width, height", [(5000, 5000), (40000, 40000)])
def test_a_pixel_bomb_is_a_413_before_it_is_decoded(url, width, height):
    bomb = base64.b64encode(png_bomb(width, height)).decode()
    assert len(bomb) < 2_000_000  # small on the wire
    before = replica_rss_mb()

    def send(_):
        return requests.post(f"{url}/search/image", json={"image_base64": bomb}, timeout=60)

    with ThreadPoolExecutor(8) as pool:  # decoded, 16 of them would take 16 x 75 MB or more
        answers = list(pool.map(send, range(16)))
    assert {a.status_code for a in answers} == {413}
    assert "pixels" in answers[0].json()["detail"]
    assert replica_rss_mb() - before < 100


def test_formats_outside_the_allow_list_are_refused(url):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="TIFF")
    answer = requests.post(f"{url}/search/image", json={"image_base64": base64.b64encode(buffer.getvalue()).decode()},
                           timeout=60)
    assert answer.status_code == 400 and "accepted: JPEG, PNG" in answer.json()["detail"]


def test_answers_name_no_storage_location(url, trained_run, unseen_sample):
    root = str(trained_run["root"])
    image = base64.b64encode(storage.read_bytes(unseen_sample["image_uri"])).decode()
    answers = [requests.get(f"{url}/healthz", timeout=30).text,
               requests.post(f"{url}/search/text", json={"text": unseen_sample["text"]}, timeout=60).text,
               requests.post(f"{url}/search/image", json={"image_base64": image}, timeout=60).text,
               requests.post(f"{url}/score", json={"text": "x", "image_base64": image}, timeout=60).text]
    for answer in answers:
        assert root not in answer and "file://" not in answer and "s3://" not in answer


def test_a_gallery_image_missing_from_storage_is_a_one_line_404(url, trained_run, unseen_sample):
    samples = storage.read_parquet(str(trained_run["root"] / "data" / "samples.parquet")).to_pylist()
    victim = next(s for s in samples if s["sample_id"] != unseen_sample["sample_id"])
    path = Path(victim["image_uri"])
    path.rename(path.with_suffix(".moved"))
    try:
        answer = requests.get(f"{url}/images/{victim['sample_id']}", timeout=30)
    finally:
        path.with_suffix(".moved").rename(path)
    assert answer.status_code == 404 and "cannot be read" in answer.json()["detail"]
    assert str(path) not in answer.text


def test_the_page_and_gallery_images_carry_nosniff_and_a_content_security_policy(url, unseen_sample):
    page = requests.get(f"{url}/", timeout=30)
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy and "frame-ancestors 'none'" in policy
    assert "'unsafe-inline'" not in policy
    image = requests.get(f"{url}/images/{unseen_sample['sample_id']}", timeout=30)
    assert image.headers["content-security-policy"] == "default-src 'none'; sandbox"
    assert page.headers["x-content-type-options"] == image.headers["x-content-type-options"] == "nosniff"


@pytest.fixture(scope="module")
def keyed_url(trained_run, url):
    """A second app, /keyed, whose replicas find an API key in their environment (on a cluster
    it comes from a Kubernetes Secret; here, from the replica's runtime_env)."""
    from ray import serve

    from entityclip.config import to_dict
    from entityclip.pipeline import with_variant
    from entityclip.serving.app import RetrievalServer

    cfg = with_variant(trained_run["cfg"], "entityclip")
    cfg = replace(cfg, serve=replace(cfg.serve, api_key_env="ENTITYCLIP_TEST_KEY"))
    app = RetrievalServer.options(ray_actor_options={
        "num_cpus": 0.25, "runtime_env": {"env_vars": {"ENTITYCLIP_TEST_KEY": "open-sesame"}}}).bind(to_dict(cfg), "entityclip")
    serve.run(app, name="keyed", route_prefix="/keyed")
    yield f"{url}/keyed"
    serve.delete("keyed")


def test_with_an_api_key_only_the_page_and_health_check_are_open(keyed_url, unseen_sample):
    assert requests.get(f"{keyed_url}/healthz", timeout=30).status_code == 200
    assert requests.get(f"{keyed_url}/", timeout=30).status_code == 200
    for path in ("/search/text", "/score"):
        answer = requests.post(f"{keyed_url}{path}", json={"text": "x"}, timeout=30)
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
    assert requests.get(f"{keyed_url}/images/{unseen_sample['sample_id']}", timeout=30).status_code == 401
    wrong = ServeClient(keyed_url, api_key="guess")
    with pytest.raises(ServeError, match="HTTP 401: missing or wrong API key"):
        wrong.search_text("x")
    assert wrong.retried == 0  # a refusal is an answer: not sent again
    answer = ServeClient(keyed_url, api_key="open-sesame").search_text(unseen_sample["text"], k=3)
    assert len(answer["results"]) == 3


def test_serving_on_a_network_interface_without_an_api_key_is_refused(trained_run, monkeypatch):
    from entityclip.errors import ConfigError
    from entityclip.serving.deploy import start_serving

    monkeypatch.delenv("ENTITYCLIP_API_KEY", raising=False)
    cfg = trained_run["cfg"]
    with pytest.raises(ConfigError, match="opens the API to the network"):
        start_serving(replace(cfg, serve=replace(cfg.serve, host="0.0.0.0")))
