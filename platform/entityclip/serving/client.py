"""`ServeClient`: the platform's HTTP client for the retrieval service, used by `entityclip query`,
the pipeline's smoke query and the benchmarks.

    from entityclip.serving.client import ServeClient
    client = ServeClient("http://127.0.0.1:8000")          # key from $ENTITYCLIP_API_KEY, if set
    client.search_text("Velmora Rovers lift the cup", k=5)

Every endpoint is read-only, so a request that got no answer from a replica is sent again (at
most `retries` times, after a jittered pause): a connection refused, reset or cut off mid-answer
while a replica dies or restarts, or a proxy's 500/502/503/504 that carries no answer of ours (our own errors
are JSON with a `detail`). Any other client should do the same (docs/operations.md).
"""

from __future__ import annotations

import base64
import os
import random
import time

import requests

from entityclip.errors import EntityClipError

RETRY_STATUSES = {500, 502, 503, 504}
# No (whole) answer came back: refused, reset, timed out, or cut off mid-body.
NO_ANSWER = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class ServeError(EntityClipError):
    """The service answered with an error (`status`), or could not be reached (status 0)."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"HTTP {status}: {detail}" if status else detail)
        self.status, self.detail = status, detail


def _json_object(response: requests.Response) -> dict | None:
    """The answer of a replica (a JSON object, `detail` on errors); None for anything else, such
    as the page a proxy sends when it lost the replica."""
    try:
        answer = response.json()
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


class ServeClient:
    def __init__(self, base_url: str, api_key: str | None = None, retries: int = 2, timeout_s: float = 60.0,
                 backoff_s: float = 0.2):
        self.base_url = base_url.rstrip("/")
        key = os.environ.get("ENTITYCLIP_API_KEY", "") if api_key is None else api_key
        self.session = requests.Session()
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"
        self.retries, self.timeout_s, self.backoff_s = retries, timeout_s, backoff_s
        self.retried = 0  # requests sent again, over this client's life

    def request(self, method: str, path: str, payload: dict | None = None) -> dict:
        """The JSON answer, or `ServeError` with the server's one-line detail."""
        attempt = 0
        while True:
            last = attempt == self.retries
            try:
                response = self.session.request(method, self.base_url + path, json=payload, timeout=self.timeout_s)
            except NO_ANSWER as exc:
                if last:
                    raise ServeError(0, f"cannot reach {self.base_url} ({type(exc).__name__})") from None
            else:
                ours = _json_object(response)
                if response.status_code < 400 and ours is not None:
                    return ours
                if last or ours is not None or response.status_code not in RETRY_STATUSES:
                    raise ServeError(response.status_code, str((ours or {}).get("detail", response.reason)))
            attempt += 1
            self.retried += 1
            time.sleep(self.backoff_s * 2 ** attempt * random.uniform(0.5, 1.5))

    def search_text(self, text: str, k: int = 10, explanation: str | None = None) -> dict:
        payload = {"text": text, "k": k} | ({"explanation": explanation} if explanation is not None else {})
        return self.request("POST", "/search/text", payload)

    def search_image(self, image: bytes, k: int = 10) -> dict:
        return self.request("POST", "/search/image", {"image_base64": base64.b64encode(image).decode(), "k": k})

    def search_composed(self, image: bytes, text: str, k: int = 10, explanation: str | None = None) -> dict:
        payload = {"image_base64": base64.b64encode(image).decode(), "text": text, "k": k}
        return self.request("POST", "/search/composed",
                            payload | ({"explanation": explanation} if explanation is not None else {}))

    def score(self, text: str, image: bytes, explanation: str | None = None) -> dict:
        payload = {"text": text, "image_base64": base64.b64encode(image).decode()}
        return self.request("POST", "/score", payload | ({"explanation": explanation} if explanation is not None else {}))

    def health(self) -> dict:
        return self.request("GET", "/healthz")
