"""Model specs: turn `torchvision:NAME`, `demo:NAME`, `package.module:factory` or `FILE.pt2` into a model.

Untrained models are built under a fixed seed, so every load of the same spec (analysis, execution,
measurement) sees the same weights: global pruning ranks channels by weight magnitude, and the estimate
must rank them the same way the executor does.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .demos import DEMOS
from .errors import UserInputError
from .pt2 import load_pt2

SPEC_FORMS = (
    "accepted model specs: torchvision:NAME (e.g. torchvision:resnet18), demo:NAME "
    f"({', '.join('demo:' + n for n in DEMOS)}), package.module:factory (a callable returning an "
    "nn.Module; its module may be on PYTHONPATH), or a path to a .pt2 file written by torch.export.save"
)
DEFAULT_IMAGE_SHAPE = (1, 3, 224, 224)
SEED = 0


Shape = tuple[int, ...]
# one input's shape, or (a model of several inputs, fed positionally) one shape per input
InputShape = Shape | tuple[Shape, ...]

# --input-shape's syntax: a shape is comma-separated positive integers (`x` also separates); a model of several
# inputs takes one shape per positional input, separated by `;`. ModelInput's pydantic `pattern` is this expression,
# so the Prefect UI's form rejects what parse_input_shape would.
_DIM = r"\s*0*[1-9][0-9]*\s*"
_SHAPE = rf"{_DIM}(?:[,x]{_DIM})*"
INPUT_SHAPE_PATTERN = rf"^(?:{_SHAPE}(?:;{_SHAPE})*)?$"
INPUT_SHAPE_SYNTAX = ("comma-separated positive integers such as 1,3,224,224; a model of several inputs takes one "
                      "shape per input, in forward's order, separated by ';' (1,3,224,224;1,16)")


def input_shapes(input_shape) -> tuple[Shape, ...]:
    """Every input's shape, in forward's order: `(input_shape,)` for a model of one input."""
    if len(input_shape) and isinstance(input_shape[0], (tuple, list)):
        return tuple(tuple(int(d) for d in s) for s in input_shape)
    return (tuple(int(d) for d in input_shape),)


def normal_shape(input_shape):
    """The one form an input shape is kept in: a tuple of ints for a model of one input, a tuple of such tuples
    for several (lists, as JSON gives them, become tuples)."""
    shapes = input_shapes(input_shape)
    return shapes[0] if len(shapes) == 1 else shapes


def n_inputs(input_shape) -> int:
    return len(input_shapes(input_shape))


def format_input_shape(input_shape) -> str:
    """The --input-shape text of a shape: `1,3,224,224`, or `1,3,224,224;1,16` for several inputs."""
    return ";".join(",".join(map(str, s)) for s in input_shapes(input_shape))


def shape_json(input_shape) -> list:
    """A shape as JSON reports it: a list of ints, or a list of such lists for several inputs."""
    shapes = [list(s) for s in input_shapes(input_shape)]
    return shapes[0] if len(shapes) == 1 else shapes


def as_inputs(example) -> tuple[torch.Tensor, ...]:
    """A model's positional inputs: `example` is one tensor, or a tuple of them for a model of several inputs;
    every caller feeds a model as `model(*as_inputs(example))`."""
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


def seeded_inputs(input_shape, batch_size: int | None = None) -> tuple[torch.Tensor, ...]:
    """The seeded example inputs of a model of `input_shape`, one per input (every input's batch, its first
    dimension, replaced by `batch_size` where given): what every analysis and measurement of it runs on. They are
    drawn in order from one generator, so the first is the tensor a model of that one input gets."""
    g = torch.Generator().manual_seed(SEED)
    out = []
    for s in input_shapes(input_shape):
        shape = list(s)
        if batch_size is not None:
            shape[0] = batch_size
        out.append(torch.randn(*shape, generator=g))
    return tuple(out)


def seeded_input(input_shape, batch_size: int | None = None):
    """seeded_inputs as a model's example: the one tensor of a model of one input, else the tuple of them."""
    xs = seeded_inputs(input_shape, batch_size)
    return xs[0] if len(xs) == 1 else xs


@dataclass
class LoadedModel:
    spec: str
    kind: str  # torchvision | demo | factory | pt2
    model: nn.Module
    input_shape: InputShape  # tuple[int, ...]; one per input (a tuple of them) for a model of several inputs
    weights: str | None = None
    weights_sha256: str | None = None
    notes: list[str] = field(default_factory=list)
    trust_pickle: bool = False  # the user trusts this model's .pt2 with pickle, and so the artifacts made from it

    def example_input(self, batch_size: int | None = None):
        """The seeded example: a tensor, or a tuple of tensors (fed positionally) for a model of several inputs."""
        return seeded_input(self.input_shape, batch_size)

    def example_inputs(self, batch_size: int | None = None) -> tuple[torch.Tensor, ...]:
        """The seeded example as positional inputs: `model(*loaded.example_inputs())`."""
        return seeded_inputs(self.input_shape, batch_size)

    @property
    def n_inputs(self) -> int:
        return n_inputs(self.input_shape)

    @property
    def cache_key(self) -> str:
        """Identity of the model for caches: spec, input shape and the weights' content hash."""
        return f"{self.spec}|{format_input_shape(self.input_shape)}|{self.weights_sha256 or 'init'}"


def parse_input_shape(text: str | None):
    """--input-shape's text as a shape (a tuple of ints), or one shape per input (a tuple of them) where it names
    several; None where empty. Anything else is one UserInputError."""
    if text is None or text == "":
        return None
    text = str(text)
    if not re.fullmatch(INPUT_SHAPE_PATTERN, text):
        parts = text.split(";")
        why = ("an empty shape between ';'" if any(not p.strip() for p in parts)
               else "a dimension that is not a positive integer")
        raise UserInputError(f"bad --input-shape {text!r} ({why}): expected {INPUT_SHAPE_SYNTAX}")
    return normal_shape(tuple(tuple(int(d) for d in p.replace("x", ",").split(",")) for p in text.split(";")))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


DEMO_WEIGHTS = Path(__file__).parent / "weights"


def _build(spec: str, trust_pickle: bool = False) -> tuple[str, nn.Module, InputShape | None]:
    if not isinstance(spec, str) or not spec.strip():
        raise UserInputError(f"empty model spec; {SPEC_FORMS}")
    spec = spec.strip()
    if spec.endswith(".pt2"):
        path = Path(spec)
        if not path.is_file():
            raise UserInputError(f"model file {spec} does not exist; {SPEC_FORMS}")
        try:
            ep = load_pt2(path, trust_pickle)
            module = ep.module()
        except UserInputError:
            raise
        except Exception as exc:  # noqa: BLE001 - any load failure is the user's file
            raise UserInputError(f"cannot load {spec} with torch.export.load: {exc}") from None
        shape = None
        example = getattr(ep, "example_inputs", None)
        if example and example[0] and all(isinstance(a, torch.Tensor) for a in example[0]):
            shape = normal_shape(tuple((1, *a.shape[1:]) for a in example[0]))
        return "pt2", module, shape
    if ":" not in spec:
        raise UserInputError(f"unrecognised model spec {spec!r}; {SPEC_FORMS}")
    prefix, _, name = spec.partition(":")
    torch.manual_seed(SEED)
    if prefix == "torchvision":
        names = _torchvision_names()
        if name not in names:
            raise UserInputError(
                f"unknown torchvision classification model {name!r}; choose one of: {', '.join(names)}"
            )
        import torchvision

        shape = (1, 3, 299, 299) if name == "inception_v3" else None
        kwargs = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
        return "torchvision", torchvision.models.get_model(name, weights=None, **kwargs), shape
    if prefix == "demo":
        if name not in DEMOS:
            raise UserInputError(f"unknown demo model {name!r}; built-in demos: {', '.join(DEMOS)}")
        factory, shape = DEMOS[name]
        model = factory()
        trained = DEMO_WEIGHTS / f"{name}.pt"
        if trained.is_file():  # trained on digits by scripts/train_demos.py
            model.load_state_dict(torch.load(trained, map_location="cpu", weights_only=True))
        return "demo", model, shape
    # package.module:factory
    if not prefix.replace(".", "").replace("_", "").isalnum():
        raise UserInputError(f"unrecognised model spec {spec!r}; {SPEC_FORMS}")
    try:
        module = importlib.import_module(prefix)
    except Exception as exc:  # noqa: BLE001
        raise UserInputError(f"cannot import module {prefix!r} of model spec {spec!r}: {type(exc).__name__}: {exc}; {SPEC_FORMS}") from None
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        raise UserInputError(f"module {prefix!r} has no callable {name!r}; {SPEC_FORMS}")
    try:
        model = factory()
    except Exception as exc:  # noqa: BLE001
        raise UserInputError(f"factory {spec} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UserInputError(f"factory {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return "factory", model, getattr(model, "input_shape", None)


def load_model(spec: str, weights: str | None = None, input_shape: str | InputShape | None = None,
               trust_pickle: bool = False) -> LoadedModel:
    """Load a model spec in eval mode and check that it runs on the input shape (--input-shape's text, a shape, or
    one shape per input). A `.pt2` that needs pickle to load is refused unless `trust_pickle` (estimators.pt2)."""
    kind, model, default_shape = _build(spec, trust_pickle)
    shape = parse_input_shape(input_shape) if isinstance(input_shape, (str, type(None))) else normal_shape(input_shape)
    if shape is None:
        shape = normal_shape(default_shape) if default_shape else DEFAULT_IMAGE_SHAPE
    digest = None
    if weights:
        if not Path(weights).is_file():
            raise UserInputError(f"weights file {weights} does not exist (expected a state_dict saved with torch.save)")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise UserInputError(f"cannot load weights {weights} with weights_only=True: {exc}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise UserInputError(f"weights {weights} hold a {type(state).__name__}, not a state_dict")
        try:
            model.load_state_dict(state, strict=True)
        except Exception as exc:  # noqa: BLE001
            first = str(exc).strip().splitlines()
            raise UserInputError(f"weights {weights} do not fit {spec}: {' '.join(first[:3])}") from None
        digest = sha256_file(weights)
    elif kind == "pt2":
        digest = sha256_file(spec)
    if kind != "pt2":  # an exported program's module has no train/eval switch (it is exported in eval)
        model.eval()
    loaded = LoadedModel(spec=spec, kind=kind, model=model, input_shape=shape, weights=weights, weights_sha256=digest,
                         trust_pickle=trust_pickle)
    try:
        with torch.no_grad():
            model(*loaded.example_inputs())
    except Exception as exc:  # noqa: BLE001
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(
            f"input shape {format_input_shape(shape)} does not fit {spec}: {msg}; pass --input-shape N,C,H,W "
            "(a model of several inputs: one shape per input, separated by ';')"
        ) from None
    return loaded
