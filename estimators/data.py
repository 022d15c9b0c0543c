"""Data specs: the data accuracy is measured on, models are fine-tuned on and quantization calibrates on.

    digits                   scikit-learn's 8x8 digits (1,797 images, 10 classes), the built-in default:
                             a fixed stratified split, 1,347 for training and 450 for validation
    imagefolder:PATH         PATH/train/<class>/* and PATH/val/<class>/* images (torchvision ImageFolder),
                             resized to the model's input and converted to its channel count
    cifar10:PATH             torchvision's CIFAR-10 from the extracted files under PATH (never downloaded)
    package.module:function  a callable returning (train_loader, val_loader) of (inputs, labels) batches

Every problem (a missing path, a wrong layout, data whose shape or class count does not fit the model) is
a UserInputError: exit code 2 and one message naming it.
"""
from __future__ import annotations

import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from .errors import UserInputError

FORMS = ("digits", "imagefolder:PATH", "cifar10:PATH", "package.module:function")
SEED = 0


@dataclass
class LoadedData:
    spec: str
    train: Iterable  # batches of (inputs, labels)
    val: Iterable
    num_classes: int
    sample_shape: tuple[int, ...]  # one input without the batch dimension
    train_size: int
    val_size: int

    def calibration_batches(self, n: int = 4) -> list[torch.Tensor]:
        """The first `n` training batches' inputs (post-training quantization calibrates on them)."""
        out = []
        for x, _ in self.train:
            out.append(x)
            if len(out) >= n:
                break
        return out


def _bad(msg: str) -> UserInputError:
    return UserInputError(f"{msg} (data specs: {', '.join(FORMS)})")


def _digits(batch_size: int) -> LoadedData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # N x 1 x 8 x 8 in [0, 1]
    y = d.target.astype(np.int64)
    xtr, xva, ytr, yva = train_test_split(x, y, test_size=450, random_state=SEED, stratify=y)
    g = torch.Generator().manual_seed(SEED)
    train = DataLoader(TensorDataset(torch.from_numpy(xtr), torch.from_numpy(ytr)), batch_size=batch_size,
                       shuffle=True, generator=g)
    val = DataLoader(TensorDataset(torch.from_numpy(xva), torch.from_numpy(yva)), batch_size=256)
    return LoadedData("digits", train, val, 10, (1, 8, 8), len(ytr), len(yva))


def _image_transform(sample_shape: tuple[int, ...] | None):
    from torchvision import transforms

    steps = []
    if sample_shape is not None and len(sample_shape) == 3:
        c, h, w = sample_shape
        if c == 1:
            steps.append(transforms.Grayscale(1))
        steps.append(transforms.Resize((h, w)))
    steps.append(transforms.ToTensor())
    return transforms.Compose(steps)


def _check_images(paths: list[str], root: str) -> None:
    """Every image file opens (its header read, as PIL reads it first): an unreadable one is named now, not met
    as a traceback in the middle of training."""
    from PIL import Image

    bad = []
    for p in paths:
        try:
            with Image.open(p):
                pass
        except Exception as exc:  # noqa: BLE001 - PIL raises several kinds for a file that is not an image
            bad.append((p, exc))
    if bad:
        p, exc = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise _bad(f"imagefolder: {root}: cannot read image {p}{more}: {type(exc).__name__}: {exc}")


def _imagefolder(path: str, batch_size: int, sample_shape) -> LoadedData:
    from torchvision.datasets import ImageFolder

    root = Path(path)
    if not root.is_dir():
        raise _bad(f"imagefolder: {path} is not a directory")
    parts = {}
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise _bad(f"imagefolder: {path} has no {split}/ folder (expected {path}/train/<class>/* and "
                       f"{path}/val/<class>/*)")
    for split in ("train", "val"):
        d = root / split
        try:
            parts[split] = ImageFolder(str(d), transform=_image_transform(sample_shape))
        except (FileNotFoundError, RuntimeError) as exc:
            raise _bad(f"imagefolder: {d}: {exc}") from None
    if parts["train"].classes != parts["val"].classes:
        raise _bad(f"imagefolder: {path}/train and {path}/val have different classes")
    _check_images([p for split in parts.values() for p, _ in split.samples], path)
    x0, _ = parts["val"][0]
    g = torch.Generator().manual_seed(SEED)
    return LoadedData(f"imagefolder:{path}", DataLoader(parts["train"], batch_size=batch_size, shuffle=True, generator=g),
                      DataLoader(parts["val"], batch_size=batch_size), len(parts["train"].classes), tuple(x0.shape),
                      len(parts["train"]), len(parts["val"]))


CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = ("test_batch",)
# what CIFAR-10's python batches are made of: dicts of bytes, lists and uint8 arrays; nothing else may load
_ARRAY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _ArraysOnly(pickle.Unpickler):
    """CIFAR-10 ships as pickles, and unpickling can run any code a file names: this unpickler builds plain values
    and numpy arrays only, and refuses a file that names anything else before it runs."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ARRAY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-10 batch never holds (refused: "
                                     "unpickling it could run code)")


def _cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    try:
        with path.open("rb") as f:
            d = _ArraysOnly(f, encoding="latin1").load()
        data, labels = np.asarray(d["data"], dtype=np.uint8), [int(v) for v in d["labels"]]
    except FileNotFoundError:
        raise _bad(f"cifar10: {path} is missing (expected the extracted {CIFAR_DIR}/ folder: data_batch_1..5 and "
                   "test_batch; deployfit never downloads)") from None
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError, OSError) as exc:
        raise _bad(f"cifar10: {path} is not a CIFAR-10 python batch: {exc}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data) or \
            any(not 0 <= v < 10 for v in labels):
        raise _bad(f"cifar10: {path} is not a CIFAR-10 python batch (data {data.shape}, {len(labels)} labels)")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


class _Cifar10(torch.utils.data.Dataset):
    def __init__(self, root: Path, files: tuple[str, ...], transform):
        parts = [_cifar_batch(root / CIFAR_DIR / f) for f in files]
        self.images = np.concatenate([p[0] for p in parts])
        self.labels = [v for p in parts for v in p[1]]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def _cifar10(path: str, batch_size: int, sample_shape) -> LoadedData:
    if not Path(path).is_dir():
        raise _bad(f"cifar10: {path} is not a directory")
    tf = _image_transform(sample_shape if sample_shape and tuple(sample_shape) != (3, 32, 32) else None)
    train = _Cifar10(Path(path), CIFAR_TRAIN, tf)
    val = _Cifar10(Path(path), CIFAR_TEST, tf)
    x0, _ = val[0]
    g = torch.Generator().manual_seed(SEED)
    return LoadedData(f"cifar10:{path}", DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
                      DataLoader(val, batch_size=batch_size), 10, tuple(x0.shape), len(train), len(val))


def _function(spec: str) -> LoadedData:
    mod_name, fn_name = spec.rsplit(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise _bad(f"cannot import {mod_name!r} for data spec {spec!r}: {exc}") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise _bad(f"{mod_name} has no callable {fn_name!r}")
    try:
        got = fn()
    except Exception as exc:  # noqa: BLE001 - the user's data function failed: said in one line
        raise _bad(f"data function {spec} failed: {type(exc).__name__}: {exc}") from None
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        raise _bad(f"{spec} must return (train_loader, val_loader), got {type(got).__name__}")
    train, val = got
    labels, n_val, shape = [], 0, None
    try:
        batches = list(val)
    except Exception as exc:  # noqa: BLE001
        raise _bad(f"data function {spec}: its validation loader failed: {type(exc).__name__}: {exc}") from None
    for batch in batches:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)):
            raise _bad(f"{spec}: the loaders must yield (inputs, labels) batches of tensors")
        x, y = batch[0], torch.as_tensor(batch[1])
        shape = tuple(x.shape[1:])
        labels.append(y)
        n_val += len(y)
    if not n_val:
        raise _bad(f"{spec}: the validation loader is empty")
    classes = int(torch.cat(labels).max()) + 1
    n_train = len(getattr(train, "dataset", [])) if hasattr(train, "dataset") else -1
    return LoadedData(spec, train, val, classes, shape, n_train, n_val)


def load_data(spec: str | None, batch_size: int = 64, sample_shape: tuple[int, ...] | None = None) -> LoadedData:
    """Parse and load a data spec; `sample_shape` (the model's input without the batch) sizes image data."""
    if not spec or not isinstance(spec, str):
        raise _bad("empty data spec")
    if batch_size < 1:
        raise _bad(f"batch size must be at least 1, not {batch_size}")
    if spec == "digits":
        return _digits(batch_size)
    kind, _, rest = spec.partition(":")
    if kind == "imagefolder" and rest:
        return _imagefolder(rest, batch_size, sample_shape)
    if kind == "cifar10" and rest:
        return _cifar10(rest, batch_size, sample_shape)
    if rest and kind not in ("imagefolder", "cifar10") and all(p.isidentifier() for p in kind.split(".")) \
            and rest.isidentifier():
        return _function(spec)
    raise _bad(f"unknown data spec {spec!r}")


def accuracy(model: torch.nn.Module, batches: Iterable, set_eval: bool = True) -> float:
    """Top-1 accuracy in percent over (inputs, labels) batches (set_eval=False for an exported program's
    module, which has no train mode)."""
    if set_eval:
        model.eval()
    correct = total = 0
    with torch.inference_mode():
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return 100.0 * correct / max(total, 1)


def check_one_input(spec: str, loaded) -> None:
    """A data set yields one input tensor per batch: a model of several inputs is refused before anything loads."""
    if loaded.n_inputs > 1:
        raise UserInputError(f"--data {spec}: {loaded.spec} takes {loaded.n_inputs} inputs, and a data set yields one "
                             "input tensor per batch (labelled evaluation, fine-tuning and calibration need a model "
                             "of one input); leave out --data")


def load_data_for(spec: str, loaded) -> LoadedData:
    """Load a data spec sized for a loaded model and check that it fits the model (check_one_input first)."""
    check_one_input(spec, loaded)
    data = load_data(spec, sample_shape=tuple(loaded.input_shape[1:]))
    check_fits(data, loaded.model, loaded.input_shape, loaded.spec)
    return data


def check_fits(data: LoadedData, model: torch.nn.Module, input_shape: tuple[int, ...], spec: str) -> None:
    """The data's inputs have the model's input shape and the model has an output per class."""
    if tuple(data.sample_shape) != tuple(input_shape[1:]):
        raise UserInputError(f"data {data.spec} has inputs of shape {tuple(data.sample_shape)}, but {spec} takes "
                             f"{tuple(input_shape[1:])} (batch excluded)")
    x = next(iter(data.val))[0][:2]
    with torch.no_grad():
        out: Any = model.eval()(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise UserInputError(f"{spec} does not return one row of class scores per input (got "
                             f"{getattr(out, 'shape', type(out).__name__)}); accuracy needs a classifier")
    if out.shape[1] != data.num_classes:
        raise UserInputError(f"data {data.spec} has {data.num_classes} classes, but {spec} outputs {out.shape[1]} scores")
