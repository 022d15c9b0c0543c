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
    host = ref.model_copy(update={"name": "host", "provenance": prov})
    save_profile(host, path)
    seed_ort(path, host)
    return path


# seconds per column unit of hardware.calibrate.onnxrt.design: about what ONNX Runtime fitted on an x86 VM
ORT_COEFFICIENTS = {"conv.flops": 1.0, "conv.flops_off": 2.0, "gconv.flops": 4.0, "gconv.flops_off": 8.0,
                    "dwconv.flops": 2.0,
                    "dwconv.flops_off": 4.0, "gemm.flops": 4.0, "pool.flops": 50.0, "other.flops": 10.0,
                    "conv.bytes": 9.0, "gconv.bytes": 20.0, "dwconv.bytes": 5.0, "gemm.bytes": 4.0, "pool.bytes": 1.0,
                    "other.bytes": 1.0, "kernels": 2e-6, "views": 0.0, "call": 2e-5}


def seed_ort(host_path: Path, host) -> Path:
    """The ONNX Runtime profile beside the host profile at `host_path`, on `host`'s machine with ORT_COEFFICIENTS
    (INT8 QDQ twice as slow per convolution FLOP), so that tests do not each calibrate ONNX Runtime."""
    from hardware.calibrate.onnxrt import efficiency_of, runtime_shape
    from tasks.onnx_runtime import nchwc_block, ort_profile_path, runtime_text

    int8 = {**ORT_COEFFICIENTS, "conv.flops": 2.0, "conv.flops_off": 2.0}
    prof = runtime_shape(host, runtime_text(), nchwc_block()).model_copy(update={
        "efficiency": efficiency_of(ORT_COEFFICIENTS), "dtype_overrides": {"int8": efficiency_of(int8)}})
    path = ort_profile_path(host_path)
    save_profile(prof, path)
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
