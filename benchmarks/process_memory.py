"""Peak memory of the processes a run starts, by kind, read from /proc while the run goes on.

Each Ray process names its kind in its title ("ray::RayTrainWorker", "ray::ServeReplica:...",
"ray::MapWorker(MapBatches(vLLMEngineStageUDF))"); a process counts with the processes it
started (vLLM's engine core is a child of its Ray Data actor; the world LM trains in a child of
the driver). The figure per kind is the largest resident set one process of that kind (with its
children) reached; Ray's own daemons are summed per kind (core: raylet, GCS, monitors; the
dashboard with its modules; the dashboard agent; Serve's HAProxy).
Resident memory here leaves out shared-memory pages (RssShmem): a worker that reads objects
from Ray's object store maps them, and they are counted once, in the object store's figure.
Ray's object store is sampled from the raylet (bytes in use, primary copies and spilled).

    with ProcessMemory() as memory:
        ...
        interval = memory.take()   # peak MB per kind and CPU seconds per kind since the last take()
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
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
# Ray's own daemons, summed per kind: (kind, how its program's path or title ends/starts).
# Only the program (argv[0], or the script a Python runs) is matched: the raylet's arguments
# name the agent scripts it starts.
SYSTEM = (
    ("Ray dashboard", "dashboard/dashboard.py"), ("Ray dashboard agent", "dashboard/agent.py"),
    ("Ray core daemons", "/raylet"), ("Ray core daemons", "/gcs_server"), ("Ray core daemons", "log_monitor.py"),
    ("Ray core daemons", "autoscaler/_private/monitor.py"), ("Ray core daemons", "runtime_env/agent/main.py"),
    ("Serve HAProxy", "/haproxy"),
)
SUMMED = {kind for kind, _ in SYSTEM}
WORLD_LM = "world-LM trainer"  # the driver's child process that trains the synthetic world's LM
OBJECT_STORE = "object store"
TICKS = os.sysconf("SC_CLK_TCK")
SPILLED = "object store spilled (total)"


def _kind(cmdline: bytes) -> str | None:
    argv = cmdline.decode(errors="replace").split("\0")
    title = argv[0]
    for kind, prefix in KINDS:
        if title.startswith(prefix):
            return kind
    if title.startswith("ray::") or any(a.endswith("workers/default_worker.py") for a in argv[:3]):
        return "other Ray workers"
    if title.startswith("ray-dashboard-"):  # the dashboard's module processes
        return "Ray dashboard"
    if any("entityclip.explain.world_lm" == a for a in argv[:4]):
        return WORLD_LM
    program = next((a for a in argv[1:3] if a.endswith(".py")), title)  # a Python daemon's script
    return next((kind for kind, end in SYSTEM if title.endswith(end) or program.endswith(end)), None)


@dataclass
class Proc:
    parent: int
    rss_kb: int  # resident, without shared memory
    cpu_s: float  # user + system CPU seconds so far
    cmdline: bytes


def _processes() -> dict[int, Proc]:
    """Every process readable now."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line)
            kb = lambda name: int(fields.get(name, "0 kB").split()[0])  # noqa: E731
            # utime and stime: fields 14 and 15 of stat, counted after the ")" that ends the name.
            ticks = (proc / "stat").read_text().rsplit(")", 1)[1].split()[11:13]
            # Pages shared from Ray's object store count in the object store's figure, once.
            out[int(proc.name)] = Proc(int(fields["PPid"]), kb("VmRSS") - kb("RssShmem"),
                                       sum(int(t) for t in ticks) / TICKS, (proc / "cmdline").read_bytes())
        except (OSError, KeyError, ValueError, IndexError):  # it ended between listing and reading
            continue
    return out


def _owners(procs: dict[int, Proc], driver: int) -> dict[int, tuple[int, str]]:
    """Each process's (classified ancestor, its kind): itself when it has a kind of its own."""
    kinds = {pid: _kind(p.cmdline) for pid, p in procs.items()}
    kinds[driver] = "driver"
    out = {}
    for pid in procs:
        node = pid
        while node > 1 and kinds.get(node) is None:
            node = procs[node].parent if node in procs else 0
        if node > 1:
            out[pid] = (node, kinds[node])
    return out


def sample(driver: int) -> tuple[dict[str, float], dict[int, tuple[str, float, bool]]]:
    """(MB now per kind: the driver with its non-Ray children, each kind's largest process with
    its children, Ray's daemons summed; {pid: (kind, CPU seconds so far, whether the kind is the
    process's own rather than its parent's)})."""
    procs = _processes()
    owners = _owners(procs, driver)
    totals: dict[int, int] = {}
    for pid, (owner, _) in owners.items():
        totals[owner] = totals.get(owner, 0) + procs[pid].rss_kb
    memory: dict[str, float] = {}
    for owner, kb in totals.items():
        kind = owners[owner][1]
        memory[kind] = memory.get(kind, 0) + kb / 1024 if kind in SUMMED else max(memory.get(kind, 0), kb / 1024)
    return memory, {pid: (kind, procs[pid].cpu_s, owner == pid) for pid, (owner, kind) in owners.items()}


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


@dataclass
class Interval:
    memory_mb: dict[str, float]  # peak per kind, and the object store's
    cpu_s: dict[str, float]  # CPU seconds each kind used (all its processes together)


class ProcessMemory:
    """Samples every `every_s` seconds in a thread; `take()` returns the interval since the last one."""

    def __init__(self, every_s: float = 0.25, store_every: int = 4):
        self.every_s, self.store_every = every_s, store_every
        self._peaks: dict[str, float] = {}
        self._cpu: dict[int, tuple[str, float]] = {}  # last seen per pid
        self._cpu_start: dict[int, float] = {}  # per pid, at the start of the interval
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _record(self, memory: dict[str, float], cpu: dict[int, tuple[str, float, bool]] | None = None) -> None:
        with self._lock:
            for kind, mb in memory.items():
                self._peaks[kind] = max(self._peaks.get(kind, 0.0), mb)
            for pid, (kind, seconds, own) in (cpu or {}).items():
                self._cpu_start.setdefault(pid, 0.0 if pid not in self._cpu else self._cpu[pid][1])
                # An exiting process loses its title (empty command line) and would fall to its
                # parent's kind, taking all its CPU with it: it keeps the kind it last had itself.
                if not own and pid in self._cpu:
                    kind = self._cpu[pid][0]
                self._cpu[pid] = (kind, seconds)

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.every_s):
            self._record(*sample(os.getpid()))
            n += 1
            if n % self.store_every == 0:
                self._record(object_store_mb())

    def take(self) -> Interval:
        self._record(*sample(os.getpid()))
        # An interval shorter than the sampling period has no store sample yet, and one query can
        # time out on a loaded machine: ask again before going without.
        store = {}
        for _ in range(3):
            if store := object_store_mb():
                break
        self._record(store)
        with self._lock:
            cpu: dict[str, float] = {}
            for pid, (kind, seconds) in self._cpu.items():
                cpu[kind] = cpu.get(kind, 0.0) + seconds - self._cpu_start.get(pid, seconds)
            peaks, self._peaks = self._peaks, {}
            self._cpu_start = {pid: seconds for pid, (_, seconds) in self._cpu.items()}
        return Interval({kind: round(mb, 1) for kind, mb in sorted(peaks.items())},
                        {kind: round(s, 2) for kind, s in sorted(cpu.items())})

    def __enter__(self) -> "ProcessMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
