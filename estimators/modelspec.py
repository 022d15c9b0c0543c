"""Model specs: turn `torchvision:NAME`, `demo:NAME`, `package.module:factory` or `FILE.pt2` into a model.

Untrained models are built under a fixed seed, so every load of the same spec (analysis, execution,
measurement) sees the same weights: global pruning ranks channels by weight magnitude, and the estimate
must rank them the same way the executor does.
"""
from __future__ import annotations

import hashlib
import importlib
import os
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


def seeded_input(input_shape, batch_size: int | None = None) -> torch.Tensor:
    """The seeded example input of a model of `input_shape` (its batch replaced by `batch_size` where given): what
    every analysis and measurement of it runs on."""
    shape = list(input_shape)
    if batch_size is not None:
        shape[0] = batch_size
    return torch.randn(*shape, generator=torch.Generator().manual_seed(SEED))


@dataclass
class LoadedModel:
    spec: str
    kind: str  # torchvision | demo | factory | pt2
    model: nn.Module
    input_shape: tuple[int, ...]
    weights: str | None = None
    weights_sha256: str | None = None
    notes: list[str] = field(default_factory=list)
    trust_pickle: bool = False  # the user trusts this model's .pt2 with pickle, and so the artifacts made from it

    def example_input(self, batch_size: int | None = None) -> torch.Tensor:
        return seeded_input(self.input_shape, batch_size)

    @property
    def cache_key(self) -> str:
        """Identity of the model for caches: spec, input shape and the weights' content hash."""
        return f"{self.spec}|{','.join(map(str, self.input_shape))}|{self.weights_sha256 or 'init'}"


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None or text == "":
        return None
    try:
        shape = tuple(int(p) for p in str(text).replace("x", ",").split(","))
    except ValueError:
        raise UserInputError(f"bad --input-shape {text!r}: expected comma-separated positive integers such as 1,3,224,224") from None
    if not shape or any(d <= 0 for d in shape):
        raise UserInputError(f"bad --input-shape {text!r}: expected comma-separated positive integers such as 1,3,224,224")
    return shape


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


def _build(spec: str, trust_pickle: bool = False) -> tuple[str, nn.Module, tuple[int, ...] | None]:
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
        if example and example[0] and isinstance(example[0][0], torch.Tensor):
            shape = (1, *example[0][0].shape[1:])
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


def load_model(spec: str, weights: str | None = None, input_shape: str | tuple[int, ...] | None = None,
               trust_pickle: bool = False) -> LoadedModel:
    """Load a model spec in eval mode and check that it runs on the input shape. A `.pt2` that needs pickle to
    load is refused unless `trust_pickle` (estimators.pt2)."""
    kind, model, default_shape = _build(spec, trust_pickle)
    shape = parse_input_shape(input_shape) if isinstance(input_shape, (str, type(None))) else tuple(input_shape)
    if shape is None:
        shape = default_shape or DEFAULT_IMAGE_SHAPE
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
            model(loaded.example_input())
    except Exception as exc:  # noqa: BLE001
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserInputError(
            f"input shape {','.join(map(str, shape))} does not fit {spec}: {msg}; pass --input-shape N,C,H,W"
        ) from None
    return loaded
