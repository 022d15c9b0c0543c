"""Bad input across every subcommand, table-driven: each case ends with exit code 2, one line on stderr,
{"error": ...} as the one JSON object on stdout, and no traceback. Nothing here trains or times anything."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()

SPECS = ["nosuchthing", "torchvision:resnet999", "demo:nope", "/no/such/model.pt2", "no_such_module_xyz:factory",
         "tinynets:broken_factory", "tinynets:not_a_module", "tinynets:missing"]
SHAPES = ["1,x", "0,1,8,8", "-1,1,8,8", "1,3,224,224", ",", "1,,8", "1,3;", "a,b", "0,3", "-1,3", "1,3;;1,4"]
STRATEGIES = ["shrink:0.5", "prune:1.0", "prune:-0.1", "quantize:int4", "{bad json", "distill:width:1.5", "prune",
              "prune:0.5:round_to=x", "prune:0.5:bogus", "quantize:int8,prune:0.5", "quantize:fp16,quantize:int8",
              "quantize:int8:tolerable_loss=0.01", "prune:nan", "prune:inf", "prune:0.2:layers=nosuch=0.5",
              '{"steps": [{"method": "prune"}]}', "distill:width:0", "quantize:int8:bogus=1"]
PLAN_FLAGS = [["--max-latency-ms", "nan"], ["--max-latency-ms", "inf"], ["--max-latency-ms", "-1"],
              ["--max-latency-ms", "0"], ["--max-size-mb", "nan"], ["--max-size-mb", "-1"], ["--max-params", "0"],
              ["--max-params", "-5"], ["--max-params", "1.5"], ["--max-macs", "x"], ["--max-accuracy-drop", "nan"],
              ["--max-accuracy-drop", "-1"], ["--max-accuracy-drop", "1"], ["--min-accuracy", "150"],
              ["--max-accuracy-drop", "1", "--min-accuracy", "50"], ["--batch-size", "0"], ["--top-k", "0"],
              ["--requirements", "/no/such/requirements.yaml"], ["--max-memory-mb", "inf"], ["--grid-step", "x"]]

CASES: list[list[str]] = []
for spec in SPECS:
    CASES += [["analyze", spec], ["estimate", spec], ["apply", spec, "--out", "OUT"], ["plan", spec, "--hardware",
                                                                                        "jetson-nano"]]
for shape in SHAPES:
    CASES += [["analyze", "demo:digits-cnn", "--input-shape", shape],
              ["estimate", "demo:digits-cnn", "--input-shape", shape]]
for strategy in STRATEGIES:
    CASES += [["estimate", "demo:digits-cnn", "--strategy", strategy],
              ["apply", "demo:digits-cnn", "--strategy", strategy, "--out", "OUT"]]
for flags in PLAN_FLAGS:
    CASES += [["plan", "demo:digits-cnn", "--hardware", "jetson-nano", *flags]]
for hw in ["nosuchhw", "/no/such/profile.yaml"]:
    CASES += [["estimate", "demo:digits-cnn", "--hardware", hw], ["plan", "demo:digits-cnn", "--hardware", hw],
              ["hardware", "show", hw]]
for data in ["mnist", "imagefolder:/no/such/dir", "cifar10:/no/such/dir", "tinynets:failing_loaders",
             "tinynets:not_loaders", "tinynets:nothing_here"]:
    CASES += [["estimate", "demo:digits-cnn", "--data", data]]
CASES += [["calibrate", "--hardware", "jetson-nano"], ["calibrate", "--budget", "-1"], ["calibrate", "--refit"],
          ["calibrate", "--pool", "/no/such/samples.npz"], ["sync", "/no/such/folder"], ["sync", "EMPTY"],
          ["estimate", "demo:digits-cnn", "--batch-size", "0"], ["estimate", "demo:digits-cnn", "--weights",
                                                                 "/no/such/w.pt"],
          ["apply", "demo:digits-cnn", "--strategy", "prune:0.5"], ["nosuchcommand"],
          ["estimate", "demo:digits-cnn", "--no-such-flag"], ["plan", "demo:digits-cnn"],
          # a model whose tracing fails inside the estimators (swin_v2's position-bias MLP reads a buffer)
          ["analyze", "torchvision:swin_v2_t", "--input-shape", "1,3,64,64"]]
# a model of two inputs: too few or too many shapes, and what takes one input only (data sets, static INT8)
TWO = ["tinynets:two_input_net", "--input-shape", "1,3,8,8;1,16"]
CASES += [["analyze", "tinynets:two_input_net", "--input-shape", "1,3,8,8"],
          ["analyze", "tinynets:two_input_net", "--input-shape", "1,3,8,8;1,16;1,4"],
          ["estimate", *TWO, "--strategy", "quantize:int8"], ["estimate", *TWO, "--data", "digits"],
          ["apply", *TWO, "--strategy", "prune:0.5,quantize:int8", "--out", "OUT"],
          ["plan", *TWO, "--hardware", "jetson-nano", "--data", "digits"],
          ["run", *TWO, "--hardware", "jetson-nano", "--data", "digits", "--out-dir", "EMPTY"]]


def test_the_table_is_broad():
    assert len(CASES) >= 100 and len({c[0] for c in CASES}) >= 7


@pytest.mark.parametrize("args", CASES, ids=[" ".join(c) for c in CASES])
def test_bad_input_is_one_clean_error(args, tmp_path, capsys):
    """Run through the `deployfit` entry point (flows.cli.main), as a user's shell would."""
    from flows.cli import main

    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "OUT").write_text("a file where a folder should be")
    args = [str(tmp_path / a) if a in ("OUT", "EMPTY") else a for a in args]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--json"])
    out, err = capsys.readouterr()
    assert exc.value.code == 2, (out, err)
    assert "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1, err
    assert json.loads(out)["error"]
