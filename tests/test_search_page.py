"""The search page in a real headless Chromium (Debian's package, driven by Playwright's API):
text query → thumbnails in score order with the explanation; image upload → texts; errors as
one line on the page."""

import shutil
import time

import pytest

from entityclip import storage

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def url(served_url):
    return served_url


@pytest.fixture(scope="module")
def page():
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine: scripts/test installs Debian's chromium where it runs as root")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser.new_page(viewport={"width": 1100, "height": 900})
        browser.close()


@pytest.fixture(scope="module")
def sample(unseen_sample):
    return unseen_sample


def test_a_text_query_shows_thumbnails_in_score_order_with_the_explanation(page, url, sample, trained_run, tmp_path):
    from playwright.sync_api import expect

    # Locator waits and polls from here: the page's CSP forbids eval, which wait_for_function needs.
    page.goto(f"{url}/")
    expect(page.locator("#model")).to_contain_text("entityclip")
    page.fill("#text", sample["text"])
    page.click("#text-go")
    page.wait_for_selector(".hit img")
    scores = [float(s) for s in page.locator(".hit .score").all_text_contents()]
    assert len(scores) == 12 and scores == sorted(scores, reverse=True)
    entities = storage.read_parquet(storage.join(str(trained_run["root"]), "data", "entities.parquet")).to_pylist()
    record = next(e for e in entities if e["name"] == sample["entities"][0])
    assert f"{record['primary']} {record['shape']}" in page.text_content("#explanation")
    loaded = "images => images.every(i => i.complete && i.naturalWidth > 0)"
    deadline = time.time() + 30
    while not page.locator(".hit img").evaluate_all(loaded) and time.time() < deadline:
        time.sleep(0.1)
    assert page.locator(".hit img").evaluate_all(loaded)  # every thumbnail came from /images/{id}
    assert "results in" in page.text_content("#meta")
    page.screenshot(path=str(tmp_path / "text-query.png"), full_page=True)
    assert (tmp_path / "text-query.png").stat().st_size > 1000


def test_an_uploaded_image_lists_the_texts_the_api_ranks_for_it(page, url, sample, tmp_path):
    import base64

    import requests

    image = tmp_path / "query.png"
    image.write_bytes(storage.read_bytes(sample["image_uri"]))
    page.goto(f"{url}/")
    page.set_input_files("#image", str(image))
    page.click("#image-go")
    page.wait_for_selector("#texts li")
    shown = page.locator("#texts li").all_text_contents()
    api = requests.post(f"{url}/search/image", json={"image_base64": base64.b64encode(image.read_bytes()).decode(), "k": 12},
                        timeout=60).json()["results"]
    assert len(shown) == 12 and all(hit["sample_id"] in line for hit, line in zip(api, shown))


def test_an_image_and_what_changes_show_the_images_the_api_ranks_for_the_composed_query(page, url, sample, tmp_path):
    import base64

    import requests

    image = tmp_path / "reference.png"
    image.write_bytes(storage.read_bytes(sample["image_uri"]))
    text = "this emblem, but on a snowy slope."
    page.goto(f"{url}/")
    page.set_input_files("#composed-image", str(image))
    page.fill("#composed-text", text)
    page.click("#composed-go")
    page.wait_for_selector(".hit img")
    shown = page.locator(".hit .id").all_text_contents()
    api = requests.post(f"{url}/search/composed", json={"image_base64": base64.b64encode(image.read_bytes()).decode(),
                                                        "text": text, "k": 12}, timeout=60).json()["results"]
    assert shown == [f"{hit['sample_id']} ({hit['split']})" for hit in api] and len(shown) == 12


@pytest.mark.parametrize("action, message", [
    (lambda p, tmp: p.click("#text-go"), "type a sentence"),
    (lambda p, tmp: (p.fill("#text", "x" * 1500), p.click("#text-go")), "the limit is 1000"),
    (lambda p, tmp: ((tmp / "notes.png").write_text("not an image"), p.set_input_files("#image", str(tmp / "notes.png")),
                     p.click("#image-go")), "not a recognised image"),
    (lambda p, tmp: (p.fill("#composed-text", "on a beach"), p.click("#composed-go")), "choose the image to start from"),
])
def test_errors_show_as_one_line_on_the_page(page, url, tmp_path, action, message):
    page.goto(f"{url}/")
    action(page, tmp_path)
    page.wait_for_selector("#error", state="visible")
    text = page.text_content("#error")
    assert message in text and "\n" not in text and "Traceback" not in text
    assert page.locator(".hit").count() == 0


def test_a_server_that_is_down_is_reported_on_the_page(page, url, tmp_path):
    (tmp_path / "page.html").write_text(__import__("requests").get(f"{url}/", timeout=30).text)
    page.goto((tmp_path / "page.html").as_uri())  # the page without its server
    page.fill("#text", "Velmora Rovers lift the cup")
    page.click("#text-go")
    page.wait_for_selector("#error", state="visible")
    assert "cannot be reached" in page.text_content("#error")
