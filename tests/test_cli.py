"""The command line: JSON shapes, and exit code 2 with one clear message on bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def test_analyze_json():
    r = run("analyze", "demo:digits-cnn", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert set(d) >= {"totals", "layers", "unsupported_ops"}
    assert d["totals"]["params"] == 56554
    assert {"name", "op", "input_shapes", "output_shapes", "params", "macs", "weight_bytes", "act_read_bytes",
            "act_write_bytes"} <= set(d["layers"][0])
    assert d["channel_groups"] and d["unsupported_ops"] == []


def test_analyze_table():
    r = run("analyze", "demo:digits-resnet")
    assert r.exit_code == 0
    assert "totals" in r.stdout and "params" in r.stdout and "prunable channel groups" in r.stdout


def test_estimate_json():
    r = run("estimate", "demo:digits-resnet", "--strategy", "prune:0.5,quantize:int8", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["model"] == "demo:digits-resnet"
    assert d["strategy"]["steps"][0] == {"method": "prune", "ratio": 0.5, "scope": "uniform"}
    assert set(d["pred"]) == {"params", "size_bytes", "macs", "flops", "memory_access_bytes", "peak_memory_bytes"}
    assert d["unsupported_ops"] == []


def test_factory_and_weights(tmp_path):
    from tinynets import HandNet

    w = tmp_path / "w.pt"
    torch.save(HandNet().state_dict(), w)
    r = run("estimate", "tinynets:hand_net", "--weights", str(w), "--input-shape", "1,3,8,8", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["pred"]["params"] == 1530


def test_pt2_spec(tmp_path):
    out = tmp_path / "a"
    r = run("apply", "demo:digits-cnn", "--strategy", "none", "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["err"]["params"] == 0 and d["err"]["size_bytes"] == 0
    r = run("analyze", str(out / "model.pt2"), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["totals"]["params"] == 56554


BAD = [
    (["analyze", "nosuchthing"], "unrecognised model spec"),
    (["analyze", "torchvision:resnet999"], "unknown torchvision classification model"),
    (["analyze", "demo:nope"], "unknown demo model"),
    (["analyze", "/no/such/model.pt2"], "does not exist"),
    (["analyze", "no_such_module_xyz:factory"], "cannot import module"),
    (["analyze", "tinynets:broken_factory"], "factory tinynets:broken_factory failed"),
    (["analyze", "tinynets:not_a_module"], "not a torch.nn.Module"),
    (["analyze", "tinynets:missing"], "has no callable"),
    (["analyze", "demo:digits-cnn", "--input-shape", "1,3,224,224"], "does not fit"),
    (["analyze", "demo:digits-cnn", "--input-shape", "1,x"], "bad --input-shape"),
    (["analyze", "demo:digits-cnn", "--weights", "/no/such/w.pt"], "does not exist"),
    (["estimate", "demo:digits-cnn", "--strategy", "shrink:0.5"], "unknown compression method"),
    (["estimate", "demo:digits-cnn", "--strategy", "prune:1.0"], "less than 1"),
    (["estimate", "demo:digits-cnn", "--strategy", "prune:-0.1"], "greater than or equal to 0"),
    (["estimate", "demo:digits-cnn", "--strategy", "quantize:int4"], "quantize.dtype"),
    (["estimate", "demo:digits-cnn", "--strategy", '{"steps": [{"method": "prune"}]}'], "ratio"),
    (["estimate", "demo:digits-cnn", "--strategy", "{bad json"], "not valid JSON"),
    (["estimate", "demo:digits-cnn", "--strategy", "distill:width:1.5"], "outside (0, 1]"),
    # what apply refuses, estimate refuses alike (estimators.strategy.check_executable)
    (["estimate", "demo:digits-cnn", "--strategy", "quantize:int8,prune:0.5"], "quantize must be the last step"),
    (["estimate", "demo:digits-cnn", "--strategy", "quantize:fp16,quantize:int8"], "at most one quantize step"),
    (["estimate", "demo:digits-cnn", "--strategy", "quantize:int8:tolerable_loss=0.01"], "needs --data"),
    (["estimate", "demo:digits-cnn", "--strategy", "prune:0.2:layers=nosuch=0.5"], "modules the model lacks"),
    (["apply", "demo:digits-cnn", "--strategy", "prune:0.5", "--out", "/proc/version"], "is a file, not a folder"),
    (["apply", "demo:digits-cnn", "--strategy", "prune:0.5", "--out", "/proc/deployfit-out"], "cannot be written"),
    (["plan", "demo:digits-cnn", "--hardware", "jetson-nano", "--max-latency-ms", "nan"], "finite number"),
    (["plan", "demo:digits-cnn", "--hardware", "jetson-nano", "--max-size-mb", "inf"], "finite number"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_message(args, message):
    r = run(*args, "--json")
    assert r.exit_code == 2, r.output
    assert message in r.stderr
    assert "Traceback" not in r.output
    assert "error" in json.loads(r.stdout)


def test_bad_weights_file(tmp_path):
    w = tmp_path / "w.pt"
    torch.save({"conv.weight": torch.zeros(1)}, w)
    r = run("analyze", "tinynets:hand_net", "--input-shape", "1,3,8,8", "--weights", str(w))
    assert r.exit_code == 2 and "do not fit" in r.stderr


def test_console_script_exit_code_and_no_traceback():
    env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__))
    p = subprocess.run([sys.executable, "-m", "flows.cli", "estimate", "demo:digits-cnn", "--strategy", "prune:2"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and "ratio" in p.stderr


def test_progress_lines_print_brackets_as_text(capsys):
    """Progress lines are printed as text, not taken for markup (a note can hold brackets: "[fp32   15/72 s]")."""
    from flows.cli_common import progress as _progress

    _progress("[fp32   15/72 s] 10 synthetic networks timed")
    _progress("[int8 ops   13/13 s] [/] done")
    err = capsys.readouterr().err
    assert "[fp32   15/72 s] 10 synthetic networks timed" in err and "[int8 ops   13/13 s] [/] done" in err


PARSER_BAD = [
    (["plan", "demo:digits-cnn", "--top-k", "0"], "--top-k"),
    (["apply", "demo:digits-cnn"], "Missing option '--out'"),
    (["plan", "demo:digits-cnn", "--max-params", "1.5"], "--max-params"),
    (["estimate", "demo:digits-cnn", "--batch-size", "0"], "--batch-size"),
    (["estimate", "demo:digits-cnn", "--no-such-flag"], "No such option"),
    (["nosuchcmd"], "No such command"),
]


@pytest.mark.parametrize("args,message", PARSER_BAD, ids=[" ".join(a) for a, _ in PARSER_BAD])
def test_argument_parser_errors_end_as_every_bad_input(args, message, capsys):
    """The `deployfit` entry point (flows.cli.main): what the argument parser rejects ends with exit 2, one line
    on stderr and {"error"} under --json, as errors found later do (no usage box, no traceback)."""
    from flows.cli import main

    with pytest.raises(SystemExit) as exc:
        main([*args, "--json"])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert message in json.loads(out)["error"]


def test_a_profile_with_nan_or_inf_is_refused(tmp_path):
    """A profile's numbers must be finite: NaN peaks once predicted `latency_ms: NaN` that "met" every limit."""
    import yaml

    from hardware.profile import PROFILE_DIR

    for where, value in ((("peak_gflops", "fp16"), ".nan"), (("memory_bandwidth_gbs",), ".inf")):
        d = yaml.safe_load((PROFILE_DIR / "jetson-nano.yaml").read_text())
        node = d
        for k in where[:-1]:
            node = node[k]
        node[where[-1]] = float(value.replace(".", ""))
        path = tmp_path / f"bad-{where[-1]}.yaml"
        path.write_text(yaml.safe_dump(d))
        r = run("estimate", "demo:digits-cnn", "--hardware", str(path), "--json")
        assert r.exit_code == 2 and "finite number" in r.stderr and "error" in json.loads(r.stdout), r.output


def test_a_requirements_file_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "req.yaml"
    path.write_bytes(b"max_size_mb: 1\n\xff\xfe\x00bad\n")
    r = run("plan", "demo:digits-cnn", "--hardware", "jetson-nano", "--requirements", str(path), "--json")
    assert r.exit_code == 2 and "is not UTF-8 text" in r.stderr and "error" in json.loads(r.stdout), r.output


def test_ui_refuses_a_taken_port():
    """`ui` on a port another server listens on: exit 2 and the port named, nothing started."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run("ui", "--prefect-port", str(port), "--mlflow-port", str(port + 1 if port < 65535 else port - 1))
    assert r.exit_code == 2 and f"port {port} on 127.0.0.1 is taken" in r.stderr, r.output


@pytest.mark.slow  # every command's help, each in a fresh process
def test_help_reads_cleanly_at_80_columns(monkeypatch):
    """Every command's --help fits 80 columns, names values plainly (MODEL, FILE, N; not `<str>` or `{model}`)
    and documents every option; the command list gives each command a whole sentence."""
    import subprocess
    import sys

    from flows.cli import _command

    def walk(c, path):
        yield path, c
        for name, sub in getattr(c, "commands", {}).items():
            yield from walk(sub, path + [name])

    env = {**os.environ, "COLUMNS": "80"}
    for path, cmd in walk(_command(), []):
        for p in cmd.params:
            if p.param_type_name == "option" and p.name != "help":
                assert p.help, f"deployfit {' '.join(path)} {p.opts[0]} has no help"
        out = subprocess.run([sys.executable, "-m", "flows.cli", *path, "--help"], capture_output=True, text=True,
                             env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert out.returncode == 0, out.stderr
        text = out.stdout
        assert "<" not in text.replace("<=", "") and "{" not in text, text
        assert max(len(line) for line in text.splitlines()) <= 80, text
        if not path:
            assert "..." not in text.split("Commands:")[1]
