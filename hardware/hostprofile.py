"""`host`: this machine's profile, kept in the user's cache and keyed by what its fit depends on.

A host profile belongs to a machine, not to the repository: it is fitted to operators timed on one CPU (its model
and the features that pick oneDNN's and inductor's kernels), with one number of threads, under one torch. Each
such machine has its own file, `$DEPLOYFIT_CACHE_DIR/profiles/host-<key>.yaml` (default cache
~/.cache/deployfit), written by `deployfit calibrate` or, the first time a command needs `host`, by a quick
calibration that says so. A profile fitted on another machine is never used for `host`: it can be named only as
a path (`--hardware PATH.yaml`), and then every command says where it was calibrated (foreign_note).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from .profile import HardwareProfile, load_profile_file, save_profile

HOST = "host"


def cache_dir() -> Path:
    """$DEPLOYFIT_CACHE_DIR, else $XDG_CACHE_HOME/deployfit, else ~/.cache/deployfit."""
    d = os.environ.get("DEPLOYFIT_CACHE_DIR")
    if d:
        return Path(d).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deployfit"


def host_key() -> dict[str, Any]:
    """What a host profile's fit depends on, for this process: the CPU's model name and kernel-selecting features,
    torch's intra-op threads and torch's version."""
    import torch

    from .measure import cpu_isa, cpu_name

    return {"cpu": cpu_name(), "isa": cpu_isa(),
            "threads": int(torch.get_num_threads()), "torch": str(torch.__version__)}


def key_of(profile: HardwareProfile) -> dict[str, Any] | None:
    """The host key a calibrated profile was fitted under (None: a datasheet profile, with no provenance)."""
    p = profile.provenance
    if p is None:
        return None
    return {"cpu": p.cpu, "isa": p.isa, "threads": int(p.threads), "torch": p.torch}


def key_id(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def host_profile_path(key: dict[str, Any] | None = None) -> Path:
    """Where this machine's (or `key`'s) host profile is kept."""
    return cache_dir() / "profiles" / f"host-{key_id(key or host_key())}.yaml"


def describe(key: dict[str, Any]) -> str:
    return f"{key['cpu']} ({key['isa'] or 'features unknown'}), {key['threads']} threads, torch {key['torch']}"


def foreign_note(profile: HardwareProfile) -> str | None:
    """A warning when `profile` was calibrated on a machine other than this one (None for one of this machine, and
    for datasheet profiles, which describe another device by design)."""
    theirs = key_of(profile)
    if theirs is None:
        return None
    here = host_key()
    if theirs == here:
        return None
    diff = [k for k in ("cpu", "isa", "threads", "torch") if theirs[k] != here[k]]
    return (f"the {profile.name} profile was calibrated on another machine ({describe(theirs)}; this one: "
            f"{describe(here)}; differs in {', '.join(diff)}): its latency predictions are for that machine, not "
            f"this one (use --hardware host to calibrate this machine)")


# a calibration whose networks its own fit misses by more than this (in sample, any batch) was timed on a busy
# machine: its relative costs are not to be trusted, anchored or not
BUSY_FIT_MAPE = 0.25


def fit_note(profile: HardwareProfile) -> str | None:
    """A warning when a calibrated profile's own fit is poor (hardware.calibrate.fit_profile's in-sample network
    MAPE over BUSY_FIT_MAPE): the machine was busy while it was timed."""
    fit = profile.provenance.fit if profile.provenance else {}
    worst = max((v for k, v in fit.items() if k.startswith("fp32.b") and k.endswith(".network_mape")), default=0.0)
    if worst <= BUSY_FIT_MAPE:
        return None
    return (f"the {profile.name} profile fits its own calibration networks poorly ({100 * worst:.0f}% in sample): "
            "the machine was busy while it was calibrated; run `deployfit calibrate` when it is quiet")


def profile_hash(profile: HardwareProfile) -> str:
    """A content hash of the profile (its canonical YAML): two predictions with the same hash used the same numbers."""
    text = yaml.safe_dump(profile.model_dump(exclude_none=True), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def identity(profile: HardwareProfile) -> dict[str, Any]:
    """What a run records of the profile it predicted with: name, content hash, where and when it was calibrated,
    and a warning when that was another machine."""
    prov = profile.provenance
    return {"name": profile.name, "hash": profile_hash(profile), "runtime": profile.runtime,
            "cpu": prov.cpu if prov else "", "isa": prov.isa if prov else "",
            "calibrated": prov.date if prov else "",
            "warning": "; ".join(n for n in (foreign_note(profile), fit_note(profile)) if n)}


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_calibrated(path: Path, label: str, command: str, quick_s: float,
                    fit: Callable[[Callable[[str], None]], HardwareProfile],
                    progress: Callable[[str], None] | None = None, calibrate: bool = True) -> HardwareProfile:
    """This machine's `label` profile kept at `path`; where there is none (or it describes another machine), `fit`
    one now (quick, about `quick_s`; `command` fits a fuller one), with progress, and keep it there.
    `calibrate=False`: raise instead."""
    from estimators.errors import UserInputError

    say = progress or _say
    key = host_key()
    if path.is_file():
        try:
            prof = load_profile_file(path)
        except UserInputError:  # unreadable or invalid: calibrated again
            prof = None
        if prof is not None and key_of(prof) == key:
            return prof
        say(f"{path} was calibrated for another machine: calibrating this one again")
    if not calibrate:
        raise UserInputError(f"no {label} for this machine ({describe(key)}) in {path.parent}: run `{command}`")
    say(f"no {label} for this machine ({describe(key)}) in {path.parent}: calibrating it now (quick, about "
        f"{quick_s:.0f} s; `{command}` fits a fuller one)")
    prof = fit(say)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_profile(prof, path)
    note = fit_note(prof)
    if note:
        say(f"warning: {note}")
    say(f"{label} written to {path}")
    return prof


def load_host(progress: Callable[[str], None] | None = None, calibrate: bool = True) -> HardwareProfile:
    """This machine's profile from the cache; when there is none, calibrate it now (quick), with progress, and
    keep it. `calibrate=False`: raise instead."""
    from estimators.defaults import QUICK_CALIBRATION_S

    from .calibrate import calibrate_host

    return load_calibrated(host_profile_path(), "host profile", "deployfit calibrate", QUICK_CALIBRATION_S,
                           lambda say: calibrate_host(quick=True, progress=say), progress, calibrate)


def host_calibrated() -> Path | None:
    """This machine's host profile file, where it has one (a file there fitted on another machine is not)."""
    key = host_key()
    path = host_profile_path(key)
    if not path.is_file():
        return None
    try:
        return path if key_of(load_profile_file(path)) == key else None
    except ValueError:  # unreadable or invalid: calibrated again at the next use
        return None
