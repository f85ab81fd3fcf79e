"""adamatch on the search page, in a real headless Chromium: each result can show which region of
its image every query word matched, as the API says."""

import re
from dataclasses import replace

import pytest
import requests

from tests.test_search_page import page  # noqa: F401  (the browser fixture)


@pytest.fixture(scope="module")
def adamatch_url(trained_run, serve_port):
    """An untrained adamatch packaged into the session's run root, indexed and served: the
    explanation path needs no training."""
    from ray import serve

    from entityclip.models import build_model
    from entityclip.models.checkpoint import save_checkpoint
    from entityclip.paths import RunPaths
    from entityclip.pipeline import stage_index, with_variant
    from entityclip.serving.app import APP_NAME
    from entityclip.serving.deploy import start_serving

    cfg = with_variant(trained_run["cfg"], "adamatch")
    save_checkpoint(build_model(cfg.model), RunPaths.for_config(cfg).checkpoint("adamatch"))
    stage_index(cfg)
    scaling = replace(cfg.serve.autoscaling, min_replicas=1)
    yield start_serving(replace(cfg, serve=replace(cfg.serve, port=serve_port, autoscaling=scaling)))
    serve.delete(APP_NAME)


@pytest.mark.slow
def test_each_result_shows_the_region_each_query_word_matched(page, adamatch_url):  # noqa: F811
    from playwright.sync_api import expect

    text = "Velmora Rovers lift the cup"
    page.goto(f"{adamatch_url}/")
    page.fill("#text", text)
    page.click("#text-go")
    page.wait_for_selector(".hit button.regions")
    first = page.locator(".hit").first
    first.locator("button.regions").click()
    expect(first.locator(".region")).to_have_count(5)
    assert first.locator(".region span").all_text_contents() == ["velmora", "rovers", "lift", "the", "cup"]
    sample_id = first.locator(".id").text_content().split(" ")[0]
    api = requests.post(f"{adamatch_url}/match/regions", json={"text": text, "sample_id": sample_id}, timeout=60).json()
    style = first.locator(".region").first.get_attribute("style")
    left = float(re.search(r"left: ([\d.e-]+)%", style).group(1))  # the browser writes its own float
    assert left == pytest.approx(api["words"][0]["box"][0] * 100, abs=1e-6)  # drawn where the API says
    assert page.locator("#error").is_hidden()
