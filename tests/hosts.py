"""Host profiles for tests: this machine's `host` profile seeded into a test's cache from the shipped reference
profile (cpu-avx2), re-keyed to this machine, so that tests do not each calibrate (a quick calibration takes a
minute). Its numbers are another machine's: tests check behaviour, bench/latency.py checks accuracy."""
from __future__ import annotations

from pathlib import Path

from hardware.hostprofile import host_key, host_profile_path, key_id
from hardware.profile import load_profile, save_profile


def fresh_process_key() -> dict:
    """This machine's host key as a new process sees it (torch's default threads, whatever this process set)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import json; from hardware.hostprofile import host_key; "
                          "print(json.dumps(host_key()))"], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def seed_host(cache: str | Path | None = None, key: dict | None = None) -> Path:
    """Write the reference profile as this machine's (or `key`'s) host profile into `cache` (default: the current
    $DEPLOYFIT_CACHE_DIR); returns its path. For a subprocess, pass key=fresh_process_key()."""
    key = key or host_key()
    path = host_profile_path(key) if cache is None else Path(cache) / "profiles" / f"host-{key_id(key)}.yaml"
    ref = load_profile("cpu-avx2")
    prov = ref.provenance.model_copy(update={"cpu": key["cpu"], "isa": key["isa"], "threads": key["threads"],
                                             "torch": key["torch"]})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_profile(ref.model_copy(update={"name": "host", "provenance": prov}), path)
    return path


def free_ports(n: int) -> list[int]:
    """`n` ports free on 127.0.0.1 now (bound together, then released), for servers a test starts."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
