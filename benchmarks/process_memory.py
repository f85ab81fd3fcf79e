"""Peak memory of the processes a run starts, by kind, read from /proc while the run goes on.

Each Ray process names its kind in its title ("ray::RayTrainWorker", "ray::ServeReplica:...",
"ray::MapWorker(MapBatches(vLLMEngineStageUDF))"); a process counts with the processes it
started (vLLM's engine core is a child of its Ray Data actor; the world LM trains in a child of
the driver). The figure per kind is the largest resident set one process of that kind (with its
children) reached; Ray's own daemons (raylet, GCS, dashboard, ...) are summed as one kind.
Ray's object store is sampled from the raylet (bytes in use, primary copies and spilled).

    with ProcessMemory() as memory:
        ...
        peaks = memory.take()   # {kind: MB} since the last take(), and the object store's
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

KINDS = (  # (kind, title prefix), first match wins
    ("vLLM engine", "ray::MapWorker(MapBatches(vLLMEngineStageUDF"),
    ("Ray Data workers", "ray::MapWorker"),
    ("Ray Data workers", "ray::ReadParquet"),
    ("Ray Data workers", "ray::ReadFiles"),
    ("Ray Data workers", "ray::Map"),
    ("Ray Data workers", "ray::_"),
    ("Train workers", "ray::RayTrainWorker"),
    ("Train controller", "ray::TrainController"),
    ("Serve replicas", "ray::ServeReplica"),
    ("Serve controller+proxy", "ray::ServeController"),
    ("Serve controller+proxy", "ray::ProxyActor"),
    ("idle Ray workers", "ray::IDLE"),
)
SYSTEM = ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env/agent", "haproxy")
OBJECT_STORE = "object store"
SPILLED = "object store spilled (total)"


def _kind(cmdline: bytes) -> str | None:
    title = cmdline.split(b"\0", 1)[0].decode(errors="replace")
    for kind, prefix in KINDS:
        if title.startswith(prefix):
            return kind
    if title.startswith("ray::"):
        return "other Ray workers"
    if any(part in cmdline.decode(errors="replace") for part in SYSTEM):
        return "Ray system (sum)"
    return None


def _processes() -> tuple[dict[int, int], dict[int, int], dict[int, bytes]]:
    """(parent, RSS kB, command line) of every process readable now."""
    parent, rss, cmd = {}, {}, {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            pid = int(proc.name)
            fields = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line)
            parent[pid], rss[pid] = int(fields["PPid"]), int(fields.get("VmRSS", "0 kB").split()[0])
            cmd[pid] = (proc / "cmdline").read_bytes()
        except (OSError, KeyError, ValueError):  # it ended between listing and reading
            continue
    return parent, rss, cmd


def sample(driver: int) -> dict[str, float]:
    """MB now per kind: the driver (with its non-Ray children), and each kind's largest process."""
    parent, rss, cmd = _processes()
    kinds = {pid: _kind(c) for pid, c in cmd.items()}
    kinds[driver] = "driver"
    totals: dict[int, int] = {}  # a classified process's RSS with its unclassified descendants
    for pid, kb in rss.items():
        node = pid
        while node > 1 and kinds.get(node) is None:
            node = parent.get(node, 0)
        if node > 1:
            totals[node] = totals.get(node, 0) + kb
    out: dict[str, float] = {}
    for pid, kb in totals.items():
        kind = kinds[pid]
        out[kind] = out.get(kind, 0) + kb / 1024 if kind == "Ray system (sum)" else max(out.get(kind, 0), kb / 1024)
    return out


def object_store_mb() -> dict[str, float]:
    """MB the object store holds now (shared memory and its disk fallback) and MB spilled so far;
    nothing without a Ray connection."""
    try:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        if not ray.is_initialized():
            return {}
        stats = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address),
                                      timeout_seconds=5).store_stats
        return {OBJECT_STORE: (stats.object_store_bytes_used + stats.object_store_bytes_fallback) / 2**20,
                SPILLED: stats.spilled_bytes_total / 2**20}
    except Exception:  # an internal API: a sample lost is better than a benchmark lost
        return {}


class ProcessMemory:
    """Samples every `every_s` seconds in a thread; `take()` returns the peaks since the last one."""

    def __init__(self, every_s: float = 0.25, store_every: int = 4):
        self.every_s, self.store_every = every_s, store_every
        self._peaks: dict[str, float] = {}
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _record(self, values: dict[str, float]) -> None:
        with self._lock:
            for kind, mb in values.items():
                self._peaks[kind] = max(self._peaks.get(kind, 0.0), mb)

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.every_s):
            self._record(sample(os.getpid()))
            n += 1
            if n % self.store_every == 0:
                self._record(object_store_mb())

    def take(self) -> dict[str, float]:
        self._record(sample(os.getpid()))
        self._record(object_store_mb())
        with self._lock:
            peaks, self._peaks = self._peaks, {}
        return {kind: round(mb, 1) for kind, mb in sorted(peaks.items())}

    def __enter__(self) -> "ProcessMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
