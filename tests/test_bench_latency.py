"""bench/latency.py's bookkeeping (no timing): a resumed run continues the split of the run it resumes."""
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "latency.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH.parent))  # its `nets` module, beside it
    spec = importlib.util.spec_from_file_location("bench_latency", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _dump(models: list[tuple[str, str, str]], **extra) -> dict:
    return {"command": "python bench/latency.py", "date": "2026-12-04 17:09", "models": [
        {"name": n, "split": s, "status": st} for n, s, st in models], "rows": [
        {"model": n, "split": s, "measured_ms": 1.0} for n, s, st in models if st == "done"], **extra}


def test_a_resumed_run_continues_the_split_of_the_run_it_resumes(bench):
    held = _dump([("se_net", "held-out", "done"), ("alexnet", "held-out", "not started")])
    assert bench.dump_split(held) == "held-out"  # no split recorded: its architectures' one split
    assert bench.dump_split(_dump([("se_net", "held-out", "done"), ("resnet18", "dev", "done")])) == "all"
    assert bench.dump_split(_dump([], split="dev")) == "dev"  # as recorded
    settings = {k: 0 for k in ("strategies", "batches", "int8_batches", "rounds", "profile", "profile_hash",
                               "machine")}
    now = {"command": "python bench/latency.py --resume d.json", "date": "2026-12-04 18:24", "split": "held-out",
           **settings}
    out = bench.resumed({**held, **settings}, now)
    assert out["split"] == "held-out" and [m["name"] for m in out["models"]] == ["se_net"]
    assert [r["model"] for r in out["rows"]] == ["se_net"]
    with pytest.raises(SystemExit, match="profile_hash"):
        bench.resumed({**held, **settings}, {**now, "profile_hash": 1})

