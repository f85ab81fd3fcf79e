"""The shipped HTTP client sends a read-only request again when a replica gave no answer, and
never when the replica answered, even with an error."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from entityclip.serving.client import ServeClient, ServeError


class Scripted(BaseHTTPRequestHandler):
    """Answers each request with the next step of the server's script."""

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        step = self.server.script.pop(0)
        self.server.seen += 1
        if step == "reset":  # the connection dies with no answer, as when a replica is SIGKILLed
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if step == "cut":  # the answer starts, then the connection dies mid-body
            self.send_response(200)
            self.send_header("content-length", "1000")
            self.end_headers()
            self.wfile.write(b'{"results": [')
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        status, body, kind = step
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


OURS = {"results": [], "model": {"variant": "entityclip"}}
PROXY_502 = (502, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html")


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    httpd.seen = 0
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()


def client_for(server, retries=2):
    return ServeClient(f"http://127.0.0.1:{server.server_address[1]}", api_key="", retries=retries, backoff_s=0.01)


@pytest.mark.parametrize("lost", [["reset"], ["cut"], [PROXY_502], ["reset", PROXY_502]])
def test_a_request_the_replica_never_answered_is_sent_again(server, lost):
    server.script = lost + [(200, json.dumps(OURS).encode(), "application/json")]
    client = client_for(server)
    assert client.search_text("Velmora Rovers lift the cup") == OURS
    assert client.retried == len(lost) and server.seen == len(lost) + 1


@pytest.mark.parametrize("status", [400, 413, 503])
def test_an_error_answered_by_the_replica_is_not_sent_again(server, status):
    server.script = [(status, json.dumps({"detail": "text is empty"}).encode(), "application/json")]
    client = client_for(server)
    with pytest.raises(ServeError, match=f"HTTP {status}: text is empty"):
        client.search_text(" ")
    assert client.retried == 0 and server.seen == 1


def test_retries_are_bounded_and_end_in_one_clear_error(server):
    server.script = [PROXY_502] * 3
    with pytest.raises(ServeError, match="HTTP 502: Bad Gateway"):
        client_for(server, retries=2).search_text("x")
    assert server.seen == 3


def test_an_unreachable_server_is_one_clear_error():
    with pytest.raises(ServeError, match="cannot reach http://127.0.0.1:9"):
        ServeClient("http://127.0.0.1:9", retries=1, backoff_s=0.01).search_text("x")
