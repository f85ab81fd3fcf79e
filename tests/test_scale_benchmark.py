"""benchmarks/scale.py at a tiny size: each stage timed at each size, its memory by process
kind, and how its cost grows fitted and plotted. (The measured runs are in docs/scale.md.)"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def scale():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("scale_benchmark", BENCHMARKS / "scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_exponent_fit_reads_linear_fixed_and_quadratic_growth(scale):
    assert scale.exponent([1, 4, 16], [3, 12, 48]) == pytest.approx(1.0)
    assert scale.exponent([1, 4, 16], [5, 5, 5]) == pytest.approx(0.0)
    assert scale.exponent([1, 4, 16], [1, 16, 256]) == pytest.approx(2.0)
    assert scale.exponent([1], [3]) is None


def test_each_stage_is_timed_and_its_processes_measured_at_each_size(scale, ray_session, tmp_path, capsys):
    args = scale.parse_args(["--sizes", "1,2", "--base-entities", "4", "--stages", "data,explain",
                             "--png", str(tmp_path / "scale.png"), *[a for o in TINY for a in ("--set", o)]])
    runs = scale.measure(args)
    assert [(r.stage, r.size) for r in runs] == [("data", 1), ("explain", 1), ("data", 2), ("explain", 2)]
    # 4 and 8 entities, 6 samples and 4 composed queries each; 8 compositional
    assert [r.rows for r in runs] == [48, 48, 88, 88]
    for r in runs:
        assert r.seconds > 0 and r.memory_mb["driver"] > 100  # the driver holds torch and Ray
        # A stage can take less CPU time than one clock tick in the driver: the work is in workers.
        assert scale.OBJECT_STORE in r.memory_mb and "driver" in r.cpu_s and sum(r.cpu_s.values()) > 0
    rates = scale.growth(runs)
    assert set(rates) == {"data", "explain"} and all(isinstance(g["time_exponent"], float) for g in rates.values())
    scale.print_tables(runs, rates)
    table = capsys.readouterr().out
    assert "| data | 2x |" in table and "| explain | samples explained |" in table
    scale.plot(runs, str(tmp_path / "scale.png"))
    assert (tmp_path / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_grown_gallery_keeps_the_spread_it_was_asked_for(scale):
    from big_gallery import clustered_vectors

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 64)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors, parents = clustered_vectors(centres, 5000, cosine=0.7)
    assert vectors.shape == (5000, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert parents.tolist() == [i % 50 for i in range(5000)]
    same = [float(vectors[i] @ vectors[i + 50]) for i in range(1000)]  # two neighbours of one centre
    assert abs(np.mean(same) - 0.7) < 0.03
    other = [float(vectors[i] @ vectors[i + 1]) for i in range(1000)]  # neighbours of different centres
    assert abs(np.mean(other)) < 0.1


def test_a_process_keeps_its_cpu_under_its_own_kind_when_it_loses_its_title_on_exit(scale):
    from process_memory import ProcessMemory

    memory = ProcessMemory()
    memory.take()
    fake = 2**22 + 1  # a pid no real process has
    memory._record({}, {fake: ("Train workers", 5.0, True)})
    memory._record({}, {fake: ("Ray core daemons", 9.0, False)})  # exiting: now filed under the raylet
    assert memory.take().cpu_s["Train workers"] == 9.0
