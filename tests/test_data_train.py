"""Data specs (and their errors), the knowledge-distillation loss, and execution with training on digits:
fine-tuning recovers a pruned model, a distilled student learns, INT8 keeps the accuracy."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from estimators.data import check_fits, load_data
from estimators.errors import UserInputError
from estimators.modelspec import load_model
from estimators.strategy import parse_strategy
from flows.cli import app
from tasks.apply import apply_and_measure
from tasks.train import TrainConfig, accuracy, kd_loss


def test_digits_spec():
    d = load_data("digits")
    assert (d.train_size, d.val_size, d.num_classes, d.sample_shape) == (1347, 450, 10, (1, 8, 8))
    x, y = next(iter(d.val))
    assert x.shape[1:] == (1, 8, 8) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert len(d.calibration_batches(2)) == 2
    again = load_data("digits")  # the split is fixed
    assert torch.equal(next(iter(again.val))[0], x)


def test_package_function_spec():
    d = load_data("tinynets:tiny_loaders")
    assert d.num_classes == 10 and d.sample_shape == (1, 8, 8) and d.val_size == 40


def test_imagefolder_spec(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    d = load_data(f"imagefolder:{tmp_path}", sample_shape=(1, 8, 8))
    assert d.num_classes == 2 and d.sample_shape == (1, 8, 8) and d.val_size == 6
    (tmp_path / "train" / "dog" / "9.png").write_bytes(b"not an image")  # an unreadable file is named up front
    with pytest.raises(UserInputError, match=r"cannot read image .*9\.png"):
        load_data(f"imagefolder:{tmp_path}", sample_shape=(1, 8, 8))


BAD_DATA = [
    ("", "empty data spec"),
    ("mnist", "unknown data spec"),
    ("imagefolder:/no/such/dir", "is not a directory"),
    ("cifar10:/no/such/dir", "is not a directory"),
    ("no_such_module_xyz:loaders", "cannot import"),
    ("tinynets:nothing_here", "no callable"),
    ("tinynets:not_loaders", "must return (train_loader, val_loader)"),
    ("tinynets:failing_loaders", "failed: OSError: dataset server unreachable"),
]


@pytest.mark.parametrize("spec,words", BAD_DATA)
def test_bad_data_specs(spec, words):
    with pytest.raises(UserInputError) as exc:
        load_data(spec)
    assert words in str(exc.value) and "data specs:" in str(exc.value)


def test_wrong_layouts(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(UserInputError, match="no val/ folder"):
        load_data(f"imagefolder:{tmp_path}")
    with pytest.raises(UserInputError, match="never downloads"):
        load_data(f"cifar10:{tmp_path}")


def test_data_that_does_not_fit_the_model():
    digits = load_data("digits")
    r18 = load_model("torchvision:resnet18")
    with pytest.raises(UserInputError, match=r"inputs of shape \(1, 8, 8\)"):
        check_fits(digits, r18.model, r18.input_shape, r18.spec)
    five = load_model("tinynets:five_class_net", input_shape="1,1,8,8")
    with pytest.raises(UserInputError, match="10 classes, but tinynets:five_class_net outputs 5"):
        check_fits(digits, five.model, five.input_shape, five.spec)


def test_cli_data_errors_exit_2(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["apply", "demo:digits-cnn", "--out", str(tmp_path / "o"), "--data", "imagefolder:/nope",
                            "--json"])
    assert r.exit_code == 2 and "not a directory" in json.loads(r.stdout)["error"]
    r = runner.invoke(app, ["apply", "torchvision:resnet18", "--out", str(tmp_path / "o"), "--data", "digits"])
    assert r.exit_code == 2 and "inputs of shape" in r.stderr
    r = runner.invoke(app, ["apply", "demo:digits-cnn", "--out", str(tmp_path / "o"), "--data", "digits",
                            "--finetune-epochs", "-1"])
    assert r.exit_code == 2 and "--finetune-epochs" in r.stderr


def test_kd_loss_on_known_logits():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    y = torch.tensor([0])
    T, a = 2.0, 0.5

    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    ps, pt = softmax([0.5, 0.0]), softmax([0.0, 0.5])
    kl = sum(q * math.log(q / p) for p, q in zip(ps, pt))
    ce = -math.log(softmax([1.0, 0.0])[0])
    expect = a * T * T * kl + (1 - a) * ce
    assert float(kd_loss(s, t, y, T, a)) == pytest.approx(expect, rel=1e-6)
    assert float(kd_loss(t, t, torch.tensor([1]), T, 1.0)) == pytest.approx(0.0, abs=1e-7)  # same logits: no soft loss


def test_shipped_demo_weights_are_trained():
    d = load_data("digits")
    for name in ("digits-cnn", "digits-resnet"):
        assert accuracy(load_model(f"demo:{name}").model, d.val) >= 97.0, name


def test_finetune_recovers_pruned_accuracy(tmp_path):
    loaded = load_model("demo:digits-cnn")
    strat = parse_strategy("prune:0.5")
    raw = apply_and_measure(loaded, strat, str(tmp_path / "raw"), data_spec="digits", train_cfg=TrainConfig(epochs=0))
    tuned = apply_and_measure(loaded, strat, str(tmp_path / "ft"), data_spec="digits", train_cfg=TrainConfig(epochs=3))
    assert raw.meas.accuracy < 60.0  # pruning alone wrecks it
    assert tuned.meas.accuracy >= 95.0 and tuned.meas.accuracy - raw.meas.accuracy > 30.0
    assert tuned.meas.accuracy_drop == pytest.approx(tuned.data["accuracy_before"] - tuned.meas.accuracy,
                                                           abs=1e-3)
    assert tuned.training[0]["epochs"] == 3 and len(tuned.training[0]["history"]) == 3


def test_distilled_student_learns(tmp_path):
    rep = apply_and_measure(load_model("demo:digits-cnn"), parse_strategy("distill:width:0.5"), str(tmp_path),
                            data_spec="digits", train_cfg=TrainConfig(epochs=3))
    assert rep.training[0]["distilled"] is True
    assert rep.meas.accuracy >= 90.0  # a re-initialised student scores ~10% before training


@pytest.mark.slow  # INT8 calibrated and measured on the data
def test_int8_on_digits_within_one_point(tmp_path):
    rep = apply_and_measure(load_model("demo:digits-cnn"), parse_strategy("quantize:int8"), str(tmp_path),
                            data_spec="digits")
    assert abs(rep.meas.accuracy_drop) <= 1.0
    assert any("training inputs of digits" in line for line in rep.log)


def test_quantize_options_parse_and_round_trip():
    s = parse_strategy("prune:0.3,quantize:int8:keep_float=features.0+classifier:tolerable_loss=0.01")
    q = s.steps[-1]
    assert q.keep_float == ["features.0", "classifier"] and q.tolerable_loss == 0.01
    assert parse_strategy(s.compact()) == s
    with pytest.raises(UserInputError, match="unknown quantize option"):
        parse_strategy("quantize:int8:float=x")
    with pytest.raises(UserInputError):
        parse_strategy("quantize:int8:tolerable_loss=2")


def test_layers_kept_float_are_in_the_size_estimate(tmp_path):
    rep = apply_and_measure(load_model("demo:digits-cnn"), parse_strategy("quantize:int8:keep_float=classifier"),
                            str(tmp_path))
    assert rep.float_layers == ["classifier"]
    assert rep.pred.size_bytes == rep.meas.size_bytes
    with pytest.raises(UserInputError, match="lacks: nope"):
        apply_and_measure(load_model("demo:digits-cnn"), parse_strategy("quantize:int8:keep_float=nope"),
                          str(tmp_path / "x"))


@pytest.mark.slow  # autotune: several INT8 builds with training data
def test_autotune_falls_back_and_the_estimate_follows(tmp_path):
    """Zero tolerable loss on digits-resnet: where all-int8 loses a little (seen on AVX-512 VNNI CPUs), Intel
    Neural Compressor's autotune moves on to configurations with float layers, and the prediction is re-estimated
    with them and matches; where all-int8 loses nothing (seen on a CPU with AVX2 alone), autotune keeps it and
    nothing is re-estimated."""
    rep = apply_and_measure(load_model("demo:digits-resnet"), parse_strategy("quantize:int8:tolerable_loss=0"),
                            str(tmp_path), data_spec="digits")
    assert rep.pred.size_bytes == rep.meas.size_bytes
    assert rep.meas.accuracy_drop <= 0.0
    if rep.float_layers:
        assert rep.pred_before_tuning.size_bytes < rep.pred.size_bytes
    else:  # autotune accepted all-int8: the plain all-int8 artifact must lose nothing on this machine either
        assert rep.pred_before_tuning is None
        plain = apply_and_measure(load_model("demo:digits-resnet"), parse_strategy("quantize:int8"),
                                  str(tmp_path / "plain"), data_spec="digits")
        assert plain.meas.accuracy_drop <= 0.0, "autotune kept everything int8 although its accuracy was lower"
        assert plain.meas.size_bytes == rep.meas.size_bytes
    runner = CliRunner()
    r = runner.invoke(app, ["apply", "demo:digits-cnn", "--strategy", "quantize:int8:tolerable_loss=0.01", "--out",
                            str(tmp_path / "nodata")])
    assert r.exit_code == 2 and "needs --data" in r.stderr


def _fake_cifar(root, per_file: int = 4, payload_marker=None):
    """CIFAR-10's python layout with a few random images per batch (pickle protocol 2, as the real files)."""
    import pickle

    d = root / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, per_file)]}
        with (d / name).open("wb") as f:
            pickle.dump(batch, f, protocol=2)
    if payload_marker is not None:
        class Payload:
            def __reduce__(self):
                return open, (str(payload_marker), "w")

        with (d / "test_batch").open("wb") as f:
            pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [Payload()]}, f, protocol=2)


def test_cifar10_loads_its_batches_without_running_pickled_code(tmp_path):
    _fake_cifar(tmp_path)
    data = load_data(f"cifar10:{tmp_path}", batch_size=3)
    assert (data.train_size, data.val_size, data.num_classes, data.sample_shape) == (20, 4, 10, (3, 32, 32))
    x, y = next(iter(data.val))
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1
    bad = tmp_path / "planted"
    bad.mkdir()
    marker = tmp_path / "payload-ran"
    _fake_cifar(bad, payload_marker=marker)
    with pytest.raises(UserInputError, match=r"names io.open, which a CIFAR-10 batch never holds \(refused"):
        load_data(f"cifar10:{bad}")
    assert not marker.exists()
