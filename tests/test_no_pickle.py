"""No pickle from user-supplied or fetched files: a planted payload never runs. Every entry point that reads
such a file (a .pt2 model spec, a device worker's fetched model.pt2, `calibrate --pool`) refuses it with
exit 2 and one clear message; only an explicit --trust-pickle loads a .pt2 that needs pickle."""
import dataclasses
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from estimators.errors import UserInputError
from flows.cli import app

runner = CliRunner()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Payload:
    """Unpickling it creates the marker file: the proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def payload(marker) -> bytes:
    return pickle.dumps(Payload(marker))


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    """A small exported program saved by torch.export.save, as deployfit saves its artifacts."""
    from tasks.executors import export_program

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    path = tmp_path_factory.mktemp("pt2") / "tiny.pt2"
    torch.export.save(export_program(model, torch.randn(2, 1, 8, 8)), str(path))
    return path


def _rewrite(src, dst, replace: dict[str, bytes]) -> None:
    """Copy the .pt2 archive `src` to `dst` through torch's own archive reader and writer, its entries in
    `replace` replaced or added."""
    from torch.export.pt2_archive import PT2ArchiveReader, PT2ArchiveWriter

    with PT2ArchiveReader(str(src)) as r, PT2ArchiveWriter(str(dst)) as w:
        for name in r.get_file_names():
            if name.startswith(".data/") or name in ("byteorder",) or name in replace:
                continue  # the writer writes its own bookkeeping records
            w.write_bytes(name, r.read_bytes(name))
        for name, data in replace.items():
            w.write_bytes(name, data)


def _config(src, name: str) -> dict:
    from torch.export.pt2_archive import PT2ArchiveReader

    with PT2ArchiveReader(str(src)) as r:
        return json.loads(r.read_string(name))


WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG = "data/constants/model_constants_config.json"


def plant(src, dst, how: str, marker) -> None:
    """A copy of the program `src` whose loading with torch.export.load would run the payload, `how`:
    a pickled weight, pickled sample inputs, a pickled (opaque) constant, or native code."""
    if how == "weight":
        cfg = _config(src, WEIGHTS_CONFIG)
        first = next(iter(cfg["config"].values()))
        first["use_pickle"] = True
        _rewrite(src, dst, {WEIGHTS_CONFIG: json.dumps(cfg).encode(),
                            f"data/weights/{first['path_name']}": payload(marker)})
    elif how == "sample-inputs":
        _rewrite(src, dst, {"data/sample_inputs/model.pt": payload(marker)})
    elif how == "constant":
        cfg = _config(src, CONSTANTS_CONFIG)
        cfg["config"]["planted"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                    "tensor_meta": None}
        _rewrite(src, dst, {CONSTANTS_CONFIG: json.dumps(cfg).encode(),
                            "data/constants/opaque_obj_0": payload(marker)})
    elif how == "native-code":
        _rewrite(src, dst, {"data/aotinductor/model/model.so": b"\x7fELF"})
    else:
        raise ValueError(how)


PLANTS = ["weight", "sample-inputs", "constant", "native-code"]


@pytest.mark.parametrize("how", PLANTS)
@pytest.mark.parametrize("command", ["analyze", "estimate"])
def test_pt2_spec_that_needs_pickle_is_refused(program, tmp_path, how, command):
    marker = tmp_path / "marker"
    bad = tmp_path / "bad.pt2"
    plant(program, bad, how, marker)
    r = runner.invoke(app, [command, str(bad), "--json"])
    assert not marker.exists(), "the planted pickle ran"
    assert r.exit_code == 2, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and "needs pickle to load, refused" in r.stderr
    assert "--trust-pickle" in r.stderr and "Traceback" not in r.output
    assert "needs pickle" in json.loads(r.stdout)["error"]


@pytest.mark.parametrize("how", ["weight", "sample-inputs", "constant"])
def test_trust_pickle_loads_what_torch_would(program, tmp_path, how):
    """The control: with --trust-pickle the archive goes to torch.export.load, which runs the payload (so the
    refusals above refuse a live one)."""
    marker = tmp_path / "marker"
    bad = tmp_path / "bad.pt2"
    plant(program, bad, how, marker)
    r = runner.invoke(app, ["analyze", str(bad), "--trust-pickle", "--json"])
    assert marker.exists()
    assert r.exit_code in (0, 2) and "Traceback" not in r.output


def test_apply_and_run_refuse_a_pt2_that_needs_pickle(program, tmp_path):
    marker = tmp_path / "marker"
    bad = tmp_path / "bad.pt2"
    plant(program, bad, "weight", marker)
    r = runner.invoke(app, ["apply", str(bad), "--out", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 2 and "needs pickle" in r.stderr and not marker.exists()
    r = runner.invoke(app, ["plan", "demo:digits-cnn", "--hardware", "cpu-avx2", "--students", str(bad),
                            "--nsga-evals", "0", "--no-anchor", "--json"])
    assert r.exit_code == 2 and "needs pickle" in r.stderr and not marker.exists()


def test_not_an_archive_is_a_clean_error(tmp_path):
    bad = tmp_path / "x.pt2"
    bad.write_bytes(payload(tmp_path / "marker"))
    r = runner.invoke(app, ["analyze", str(bad), "--json"])
    assert r.exit_code == 2 and "cannot load" in r.stderr and not (tmp_path / "marker").exists()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "int8", "int8-weight-only", "fp16"])
def test_deployfits_own_artifacts_load_without_trust(tmp_path, dtype):
    """What apply and run save holds plain tensors only, and loads without --trust-pickle in a fresh process
    (INT8 programs too, whose ops the loader registers)."""
    from estimators.modelspec import load_model
    from estimators.pt2 import pickled_entries
    from tasks.executors import export_program
    from tasks.quantize_exec import quantize

    loaded = load_model("demo:digits-cnn")
    x = loaded.example_input(2)
    ep = export_program(loaded.model, x) if dtype == "fp32" else quantize(loaded.model, x, dtype).program
    path = tmp_path / "model.pt2"
    torch.export.save(ep, str(path))
    assert pickled_entries(path.read_bytes()) == []
    code = ("import sys, torch; from estimators.pt2 import load_pt2; ep = load_pt2(sys.argv[1]); "
            "print(tuple(ep.module()(torch.zeros(3, 1, 8, 8)).shape))")
    p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300,
                       cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().endswith("(3, 10)")


def test_device_worker_refuses_a_fetched_pt2_that_needs_pickle(program, tmp_path, monkeypatch):
    """The worker's measure flow loads the model.pt2 it fetched through the same check; only a worker started
    with --trust-pickle (TRUST_ENV in its environment) hands it to torch.export.load."""
    import shutil

    from flows import device, tracking

    marker = tmp_path / "marker"
    bad = tmp_path / "bad.pt2"
    plant(program, bad, "weight", marker)

    def download(uri, run_id, names, dest):
        shutil.copy(bad, os.path.join(dest, "model.pt2"))
        result = {"strategy": {"steps": []}, "input_shape": [1, 1, 8, 8], "pred": {}, "compact": "none"}
        with open(os.path.join(dest, "result.json"), "w") as f:
            json.dump(result, f)
        return {n: os.path.join(dest, n) for n in names}

    monkeypatch.setattr(tracking, "download", download)
    monkeypatch.setattr(tracking, "log_measurement", lambda *a, **k: pytest.fail("nothing to log"))
    monkeypatch.delenv(device.TRUST_ENV, raising=False)
    with pytest.raises(UserInputError, match="needs pickle to load, refused"):
        device.measure_flow.fn("run-id", "sqlite:///unused.db")
    assert not marker.exists()
    monkeypatch.setenv(device.TRUST_ENV, "1")
    with pytest.raises(Exception):  # trusted: torch unpickles the payload, then the weight is no tensor
        device.measure_flow.fn("run-id", "sqlite:///unused.db")
    assert marker.exists()


def _samples():
    """Samples of every kind a calibration keeps, built without timing anything."""
    from estimators.methods.quantize import estimate as estimate_quantize
    from estimators.strategy import QuantizeStep
    from hardware.calibrate import Samples
    from hardware.calibrate.int8 import ElementSample, Int8Sample
    from hardware.calibrate.sampling import NetSample, light_table
    from hardware.synthetic import synthetic_cnn

    model, shape = synthetic_cnn(0)
    table = light_table(model, torch.randn(1, *shape[1:]), name="synthetic-0")
    qtable = estimate_quantize(table, QuantizeStep(dtype="int8"))
    net = NetSample("synthetic-0", table, np.arange(table.n, dtype=float) * 1e-6, 1e-3, batch=1, probe_us=np.float64(3.5),
                    pace_ms=2.0)
    return Samples((100.0, 10.0, 50.0, 9.0), False, 8 << 20, 2, {1: [net], 8: [dataclasses.replace(net, batch=8)]},
                   {1: [NetSample("int8 op", qtable, np.array([1e-5]), 1e-5, batch=1)]},
                   [ElementSample("transcendental", 1000, 2e-6)], [], [Int8Sample("q", qtable, 8, 2e-3, 1e-3)],
                   [3.0, 3.1, float("nan")], 12.5, quick=True, cpu="cpu", torch=str(torch.__version__),
                   peak_runs=[((100.0, 10.0, 50.0, 9.0), 3.0)], isa="avx2", pace_readings=[2.0, 2.1],
                   retimed=[NetSample("synthetic-0", table, np.zeros(0), 1e-3, pace_ms=2.0)])


def _same(a, b, where="samples"):
    assert type(a) is type(b), f"{where}: {type(a).__name__} came back as {type(b).__name__}"
    if dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            _same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), where
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), where
    else:
        assert a == b, where


def test_samples_round_trip_as_data(tmp_path):
    from hardware.calibrate import load_samples, save_samples

    samples = _samples()
    path = tmp_path / "kept"  # any name: nothing is appended to it
    save_samples(samples, path)
    assert path.read_bytes()[:2] == b"PK" and not (tmp_path / "kept.npz").exists()
    _same(samples, load_samples(path))


def test_calibrate_pool_refuses_a_pickle(tmp_path):
    marker = tmp_path / "marker"
    old = tmp_path / "old.pkl"
    old.write_bytes(payload(marker))
    out = tmp_path / "host.yaml"
    r = runner.invoke(app, ["calibrate", "--pool", str(old), "--refit", "--out", str(out), "--json"])
    assert not marker.exists(), "the planted pickle ran"
    assert r.exit_code == 2, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and "old pickle format" in r.stderr
    assert "old pickle format" in json.loads(r.stdout)["error"] and not out.exists()
    # an npz that holds a pickled array is not unpickled either
    npz = tmp_path / "obj.npz"
    with open(npz, "wb") as f:
        np.savez(f, **{"samples.json": np.array([Payload(marker)], dtype=object)})
    r = runner.invoke(app, ["calibrate", "--pool", str(npz), "--refit", "--out", str(out), "--json"])
    assert r.exit_code == 2 and "not a calibration's samples" in r.stderr and not marker.exists()
