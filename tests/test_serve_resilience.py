"""The Serve app under real HTTP load: replicas scale out and back, a SIGKILLed replica loses
at most the few requests HAProxy cannot replay, and moving the app to another registered
version fails no request. Slow (each test drives load for tens of seconds)."""

import os
import signal
import threading
import time
from dataclasses import replace

import pytest
import requests

from entityclip.pipeline import with_variant
from entityclip.serving.client import ServeClient, ServeError
from entityclip.serving.deploy import follow_alias, start_serving

pytestmark = pytest.mark.slow


class LoadLoop:
    """`clients` threads sending text queries back to back until stopped (at most `limit_s`)."""

    def __init__(self, url: str, clients: int, limit_s: float = 120, shipped: bool = False):
        """`shipped`: send through the platform's ServeClient (which retries a request no
        replica answered) rather than bare requests."""
        self.url, self.deadline, self.shipped = url, time.time() + limit_s, shipped
        self.statuses: dict[str, int] = {}
        self.failed_at: list[float] = []
        self.versions: list[str] = []  # the registry version of each answer, in arrival order
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, i: int) -> None:
        session, client = requests.Session(), ServeClient(self.url)
        n = 0
        while not self._stop.is_set() and time.time() < self.deadline:
            n += 1
            version = None
            text = f"Velmora Rovers {i} {n}"
            try:
                if self.shipped:
                    status, version = "200", client.search_text(text, k=5)["model"].get("version")
                else:
                    response = session.post(f"{self.url}/search/text", json={"text": text, "k": 5}, timeout=60)
                    status = str(response.status_code)
                    version = response.json()["model"].get("version") if response.ok else None
            except ServeError as exc:
                status = str(exc.status or "unreachable")
            except requests.RequestException as exc:
                status = type(exc).__name__
            with self._lock:
                self.statuses[status] = self.statuses.get(status, 0) + 1
                if version:
                    self.versions.append(version)
                if status != "200":
                    self.failed_at.append(time.time())

    def __enter__(self) -> "LoadLoop":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def running_replicas() -> list:
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if a.class_name.startswith("ServeReplica:entityclip:RetrievalServer")]


def replica_count() -> int:
    from ray import serve

    return serve.status().applications["entityclip"].deployments["RetrievalServer"].replica_states.get("RUNNING", 0)


def wait_for(condition, timeout_s: float, period_s: float = 0.5) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(period_s)
    return False


def serving_config(trained_run, serve_port, model: str = "", **autoscaling):
    cfg = with_variant(trained_run["cfg"], "entityclip")  # a copy: the session's config stays as it is
    scaling = replace(cfg.serve.autoscaling, **autoscaling)
    return replace(cfg, serve=replace(cfg.serve, port=serve_port, model=model, autoscaling=scaling))


def deploy(trained_run, serve_port, model: str = "", **autoscaling):
    return start_serving(serving_config(trained_run, serve_port, model, **autoscaling))


@pytest.fixture
def cleanup():
    yield
    from ray import serve

    serve.delete("entityclip")


def test_replicas_scale_out_under_load_and_back_to_min_after_it(trained_run, serve_port, cleanup):
    url = deploy(trained_run, serve_port, min_replicas=1, max_replicas=2, target_ongoing_requests=1,
                 max_ongoing_requests=8, upscale_delay_s=1, downscale_delay_s=3, look_back_period_s=2)
    assert replica_count() == 1
    with LoadLoop(url, clients=12) as load:
        assert wait_for(lambda: replica_count() > 1, timeout_s=60), "no scale-out under load"
    assert set(load.statuses) == {"200"}, load.statuses
    assert wait_for(lambda: replica_count() == 1, timeout_s=60), "did not scale back to min after the load"


def test_a_killed_replica_loses_at_most_a_few_requests_around_the_kill(trained_run, serve_port, cleanup):
    """HAProxy replays on the other replica the requests the dead one had accepted (they are
    read-only), but never one whose connection the dying replica's kernel reset rather than
    closed: at most a few requests around the kill may fail, none after it."""
    clients = 8
    url = deploy(trained_run, serve_port, min_replicas=2, max_replicas=2)
    assert wait_for(lambda: len(running_replicas()) == 2, timeout_s=60)
    with LoadLoop(url, clients=clients) as load, LoadLoop(url, clients=clients // 2, shipped=True) as shipped:
        time.sleep(3)
        before = sum(load.statuses.values())
        victim = running_replicas()[0]
        killed_at = time.time()
        os.kill(victim.pid, signal.SIGKILL)
        time.sleep(8)
    assert sum(load.statuses.values()) > before + 50, "the load stalled after the kill"
    # Each closed-loop client has one request in flight at most: the kill can cost each one that
    # request, however HAProxy had spread them over the two replicas (5 of 8 seen once).
    assert len(load.failed_at) <= clients, load.statuses
    assert all(abs(t - killed_at) < 1.0 for t in load.failed_at), (killed_at, load.failed_at)
    # The platform's own client sends again what the dead replica never answered: none lost.
    assert set(shipped.statuses) == {"200"} and shipped.statuses["200"] > 50, shipped.statuses
    # Serve replaces the dead replica.
    assert wait_for(lambda: len(running_replicas()) == 2 and victim.pid not in {a.pid for a in running_replicas()}, 60)


def test_rolling_to_a_new_champion_fails_no_request(trained_run, serve_port, cleanup):
    """The lifecycle's last step: the champion alias moves to another version, and the serving
    process follows it (what `entityclip serve --model models:/...@champion` does every
    serve.follow_alias_s): Serve starts the new replica before it retires the old one."""
    from entityclip.pipeline import stage_register
    from entityclip.tracking import tracker_for

    old = trained_run["model"]
    tracker = tracker_for(trained_run["cfg"])
    tracker.set_alias(old.name, old.version, "champion")
    champion = f"models:/{old.name}@champion"
    cfg = serving_config(trained_run, serve_port, model=champion, min_replicas=1, max_replicas=1)
    url = start_serving(cfg)
    assert follow_alias(cfg, old.version) == old.version  # the alias has not moved: nothing to do
    new = stage_register(trained_run["cfg"], old.run_id)  # another version of the same run's model
    with LoadLoop(url, clients=4) as load:
        time.sleep(2)
        tracker.set_alias(new.name, new.version, "champion")
        assert follow_alias(cfg, old.version) == new.version
        assert wait_for(lambda: load.versions[-1] == new.version, timeout_s=30)
        time.sleep(2)
    assert set(load.statuses) == {"200"}, load.statuses
    assert load.versions[0] == old.version and load.versions[-1] == new.version
    assert load.versions.count(old.version) > 10 and load.versions.count(new.version) > 10
    health = requests.get(f"{url}/healthz", timeout=30).json()["model"]
    assert (health["name"], health["version"]) == (new.name, new.version)
