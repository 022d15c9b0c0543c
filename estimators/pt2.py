"""Loading `.pt2` programs without unpickling.

`torch.export.load` unpickles whatever an archive asks it to: weights and constants marked `use_pickle`
(`torch.load(weights_only=False)`), torchbind and opaque constants (`pickle.loads`), sample inputs and the
torch 2.7 layout's state through `torch.load`, which falls back to `weights_only=False` when the restricted
load fails; an archive's `data/aotinductor/` shared libraries are loaded as native code. A pickle can run any
code as it is read, so a `.pt2` from elsewhere (a user's model spec, an artifact fetched from the tracking
store) is loaded only when none of these entries is present and every sample-input pickle loads with
`weights_only=True` (torch's own first attempt, which then succeeds on the same bytes); otherwise it is
refused unless the caller trusts it (`trust_pickle`, the CLI's `--trust-pickle`). The archive is read into
memory once and the bytes checked are the bytes loaded.

The programs deployfit writes (`torch.export.save` of float, fp16/bf16, weight-only and INT8 programs) hold
plain tensors only and load here without trust.
"""
from __future__ import annotations

import importlib
import io
import zipfile
from pathlib import Path

import torch

from .errors import UserInputError

TRUST_HINT = "pass --trust-pickle only if you trust where the file came from (loading it can run any code)"


def _restricted_load_fails(data: bytes) -> bool:
    """Whether `torch.load(weights_only=True)` refuses the pickle `data` (torch would retry it unrestricted)."""
    try:
        torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001 - any refusal means torch.export.load would unpickle it unrestricted
        return True
    return False


def pickled_entries(data: bytes) -> list[str]:
    """The entries of the `.pt2` archive `data` that `torch.export.load` would unpickle or run as native code
    (each named with the reason); [] for an archive of plain tensors."""
    from torch.export.pt2_archive import PT2ArchiveReader
    from torch.export.pt2_archive import constants as C
    from torch.export.pt2_archive._package import _load_payload_config

    bad: list[str] = []
    try:
        if "version" in zipfile.ZipFile(io.BytesIO(data)).namelist():  # what torch.export.load's fallback reads
            bad.append("version (the torch 2.7 layout: pickled state dict, constants and inputs)")
    except zipfile.BadZipFile:
        pass  # not a zip: torch.export.load refuses it before reading anything
    with PT2ArchiveReader(io.BytesIO(data)) as reader:
        names = reader.get_file_names()
        bad += [f"{n} (native code)" for n in names if n.startswith(C.AOTINDUCTOR_DIR)]
        prefix, suffix = C.MODELS_FILENAME_FORMAT.split("{}")
        models = [n[len(prefix):-len(suffix)] for n in names if n.startswith(C.MODELS_DIR)]
        for model in models:
            inputs = C.SAMPLE_INPUTS_FILENAME_FORMAT.format(model)
            if inputs in names:
                raw = reader.read_bytes(inputs)
                if raw and _restricted_load_fails(raw):
                    bad.append(f"{inputs} (sample inputs that only load unpickled)")
            for legacy in (f"{C.WEIGHTS_DIR}{model}.pt", f"{C.CONSTANTS_DIR}{model}.pt"):
                if legacy in names and _restricted_load_fails(reader.read_bytes(legacy)):
                    bad.append(f"{legacy} (a pickle that only loads unpickled)")
            for config_file, folder in ((C.WEIGHTS_CONFIG_FILENAME_FORMAT.format(model), C.WEIGHTS_DIR),
                                        (C.CONSTANTS_CONFIG_FILENAME_FORMAT.format(model), C.CONSTANTS_DIR)):
                if config_file not in names:
                    continue
                for fqn, meta in _load_payload_config(reader, config_file).config.items():
                    if meta.use_pickle:
                        bad.append(f"{folder}{meta.path_name} ({fqn}, pickled)")
                    elif meta.path_name.startswith((C.CUSTOM_OBJ_FILENAME_PREFIX, C.OPAQUE_OBJ_FILENAME_PREFIX)):
                        bad.append(f"{folder}{meta.path_name} ({fqn}, a pickled object)")
    return bad


def load_pt2(path: str | Path, trust_pickle: bool = False) -> torch.export.ExportedProgram:
    """`torch.export.load` of `path`, refused (UserInputError) when the archive would be unpickled or run native
    code, unless `trust_pickle`. INT8 programs' `quantized_decomposed` ops are registered first."""
    try:  # int8 programs use the quantized_decomposed ops, registered by this import
        importlib.import_module("torch.ao.quantization.fx._decomposed")
    except Exception:  # noqa: BLE001
        pass
    if trust_pickle:
        return torch.export.load(str(path))
    data = Path(path).read_bytes()
    try:
        bad = pickled_entries(data)
    except Exception as exc:  # noqa: BLE001 - an archive torch cannot read is the file's fault
        raise UserInputError(f"cannot load {path} with torch.export.load: {exc}") from None
    if bad:
        shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise UserInputError(f"{path} needs pickle to load, refused: {shown}; {TRUST_HINT}")
    return torch.export.load(io.BytesIO(data))
