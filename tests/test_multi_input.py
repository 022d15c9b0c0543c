"""A model of several inputs: `--input-shape 1,3,8,8;1,16` feeds two positional inputs through analysis, estimate,
apply and the exported artifact; what cannot take several inputs (data sets, static INT8) is one clean error."""
from __future__ import annotations

import json
import re

import pytest
import torch

from estimators.errors import UserInputError
from estimators.modelspec import (INPUT_SHAPE_PATTERN, format_input_shape, load_model, parse_input_shape, seeded_input,
                                  seeded_inputs)

SPEC = "tinynets:two_input_net"
SHAPE = "1,3,8,8;1,16"
# conv 3*8*9+8, vec 16*8+8, head 16*8+8, fc 8*4+4
PARAMS = 224 + 136 + 136 + 36
# a bias adds one MAC per output element (torch-pruning's counter, which apply measures with): the conv's 8 x 8x8
# outputs take 27 + 1 each, then the three linears
MACS = 8 * 64 * (27 + 1) + 8 * (16 + 1) + 8 * (16 + 1) + 4 * (8 + 1)


def cli(capsys, *args) -> dict:
    """flows.cli.main with --json: its one JSON object (exit code 0 expected)."""
    from flows.cli import main

    try:
        main([*args, "--json"])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise AssertionError(f"exit {exc.code}: {capsys.readouterr().err}") from None
    return json.loads(capsys.readouterr().out)


def cli_error(capsys, *args) -> str:
    """flows.cli.main with --json where it must refuse: exit code 2, one stderr line; returns the error."""
    from flows.cli import main

    with pytest.raises(SystemExit) as exc:
        main([*args, "--json"])
    out, err = capsys.readouterr()
    assert exc.value.code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in out + err
    return json.loads(out)["error"]


def test_parse_one_and_several_shapes():
    assert parse_input_shape("1,3,224,224") == (1, 3, 224, 224)
    assert parse_input_shape("1x3x8x8") == (1, 3, 8, 8)
    assert parse_input_shape(SHAPE) == ((1, 3, 8, 8), (1, 16))
    assert parse_input_shape(" 1,3,8,8 ; 1,16 ") == ((1, 3, 8, 8), (1, 16))
    assert parse_input_shape(None) is None and parse_input_shape("") is None
    assert format_input_shape(parse_input_shape(SHAPE)) == SHAPE
    assert format_input_shape((1, 3, 8, 8)) == "1,3,8,8"


@pytest.mark.parametrize("text", ["1,3;", "a,b", "0,3", "-1,3", "1,3;;1,4", ";1,3", ",", "1,,8", "+1", "1,3.5"])
def test_malformed_shapes_are_refused_alike_by_parser_and_form(text):
    """parse_input_shape and ModelInput's pattern (what the Prefect UI's form validates) refuse the same texts."""
    from pydantic import ValidationError

    from tasks.pipeline import ModelInput

    with pytest.raises(UserInputError, match="bad --input-shape"):
        parse_input_shape(text)
    assert not re.fullmatch(INPUT_SHAPE_PATTERN, text)
    with pytest.raises(ValidationError):
        ModelInput(spec=SPEC, input_shape=text)


def test_form_accepts_what_the_parser_accepts():
    from tasks.pipeline import ModelInput

    for text in ["1,3,224,224", SHAPE, "1x3x8x8", "2,16;2,3,8,8;2,4"]:
        assert ModelInput(spec=SPEC, input_shape=text).input_shape == text
        assert re.fullmatch(INPUT_SHAPE_PATTERN, text) and parse_input_shape(text)
    assert ModelInput.model_json_schema()["properties"]["input_shape"]["anyOf"][0]["pattern"] == INPUT_SHAPE_PATTERN


def test_seeded_inputs():
    """Every input is seeded (the first as a model of that one input gets it) and batch replacement applies to all."""
    one = seeded_input((1, 3, 8, 8))
    img, vec = seeded_inputs(((1, 3, 8, 8), (1, 16)))
    assert torch.equal(img, one) and vec.shape == (1, 16)
    img3, vec3 = seeded_input([[1, 3, 8, 8], [1, 16]], 3)  # as a result's JSON lists the shapes
    assert img3.shape == (3, 3, 8, 8) and vec3.shape == (3, 16)
    loaded = load_model(SPEC, input_shape=SHAPE)
    assert loaded.n_inputs == 2 and loaded.input_shape == ((1, 3, 8, 8), (1, 16))
    assert loaded.cache_key == f"{SPEC}|{SHAPE}|init"
    assert [x.shape[0] for x in loaded.example_inputs(4)] == [4, 4]


def test_analyze_estimate_apply_two_inputs(capsys, tmp_path):
    rep = cli(capsys, "analyze", SPEC, "--input-shape", SHAPE)
    assert rep["input_shape"] == [[1, 3, 8, 8], [1, 16]]
    assert rep["totals"]["params"] == PARAMS and rep["totals"]["macs"] == MACS
    layers = {r["name"]: r for r in rep["layers"]}
    assert layers["conv"]["input_shapes"] == [[1, 3, 8, 8]] and layers["vec"]["input_shapes"] == [[1, 16]]
    assert layers["cat"]["output_shapes"] == [[1, 16]]
    assert {g["root"] for g in rep["channel_groups"]} == {"conv", "vec", "head"}

    est = cli(capsys, "estimate", SPEC, "--input-shape", SHAPE, "--strategy", "prune:0.5")
    assert est["pred"]["params"] < PARAMS
    out = tmp_path / "pruned"
    app = cli(capsys, "apply", SPEC, "--input-shape", SHAPE, "--strategy", "prune:0.5", "--out", str(out))
    assert app["pred"] == est["pred"]
    for k in ("params", "macs", "size_bytes"):
        assert app["meas"][k] == est["pred"][k], k

    # the artifact takes both inputs, at any batch (every input's first dimension is the one dynamic batch)
    from estimators.pt2 import load_pt2

    run = load_pt2(out / "model.pt2").module()
    with torch.no_grad():
        y = run(torch.randn(5, 3, 8, 8), torch.randn(5, 16))
    assert y.shape == (5, 4)
    # and is itself a model spec of two inputs
    again = cli(capsys, "analyze", str(out / "model.pt2"))
    assert again["input_shape"] == [[1, 3, 8, 8], [1, 16]] and again["totals"]["params"] == est["pred"]["params"]


def test_half_precision_exports_both_inputs(tmp_path):
    from tasks.apply import apply_and_measure, saved_latency
    from estimators.strategy import parse_strategy

    rep = apply_and_measure(load_model(SPEC, input_shape=SHAPE), parse_strategy("quantize:fp16"), str(tmp_path))
    assert rep.meas.size_bytes == rep.pred.size_bytes
    lat = saved_latency(rep.artifact["model"], rep.strategy, rep.input_shape, 3)
    assert lat["batch_size"] == 3 and lat["latency_ms"] > 0


def test_search_proposes_no_int8_for_several_inputs():
    from estimators.analyze import analyze
    from hardware.profile import load_profile
    from search.plan import quantize_dtypes

    a100 = load_profile("a100")
    assert "int8" in quantize_dtypes(a100, analyze(load_model("tinynets:hand_net", input_shape="1,3,8,8")))
    assert "int8" not in quantize_dtypes(a100, analyze(load_model(SPEC, input_shape=SHAPE)))


@pytest.mark.parametrize("args,reason", [
    (["estimate", SPEC, "--input-shape", SHAPE, "--strategy", "quantize:int8"], "static INT8"),
    (["apply", SPEC, "--input-shape", SHAPE, "--strategy", "prune:0.3,quantize:int8", "--out", "OUT"], "static INT8"),
    (["estimate", SPEC, "--input-shape", SHAPE, "--data", "digits"], "takes 2 inputs"),
    (["apply", SPEC, "--input-shape", SHAPE, "--strategy", "prune:0.3", "--data", "digits", "--out", "OUT"],
     "takes 2 inputs"),
    (["analyze", SPEC, "--input-shape", "1,3,8,8"], "separated by ';'"),
])
def test_what_takes_one_input_refuses_several(args, reason, capsys, tmp_path):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    assert reason in cli_error(capsys, *args)
    assert not (tmp_path / "out" / "model.pt2").exists()


@pytest.mark.slow
def test_latency_anchored_and_measured_with_two_inputs(capsys, tmp_path):
    """--hardware host: the original is exported and timed on both inputs (the anchor), and the artifact in
    alternation with it."""
    rep = cli(capsys, "apply", SPEC, "--input-shape", SHAPE, "--strategy", "prune:0.5", "--hardware", "host",
              "--batch-size", "2", "--out", str(tmp_path / "p"))
    assert rep["hardware"]["anchor"] is not None and rep["latency_basis"].startswith("anchor")
    assert rep["meas"]["latency_ms"] > 0 and rep["latency_measurement"]["rounds"] > 0
