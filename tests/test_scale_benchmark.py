"""benchmarks/scale.py at a tiny size: each stage timed at each size, its memory by process
kind, and how its cost grows fitted and plotted. (The measured runs are in docs/scale.md.)"""

import importlib.util
import sys
from pathlib import Path

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
    assert [r.rows for r in runs] == [24, 24, 48, 48]  # 4 and 8 entities, 6 samples each
    for r in runs:
        assert r.seconds > 0 and r.memory_mb["driver"] > 100  # the driver holds torch and Ray
        assert scale.OBJECT_STORE in r.memory_mb
    rates = scale.growth(runs)
    assert set(rates) == {"data", "explain"} and all(isinstance(g["time_exponent"], float) for g in rates.values())
    scale.print_tables(runs, rates)
    table = capsys.readouterr().out
    assert "| data | 2x |" in table and "| explain | samples explained |" in table
    scale.plot(runs, str(tmp_path / "scale.png"))
    assert (tmp_path / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
