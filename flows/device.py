"""Measurement on the target device through a Prefect work pool per hardware target.

    deployfit worker --hardware NAME     (on the device: creates pool `deployfit-NAME` if needed, registers the
                                          `deployfit-measure/NAME` deployment, starts a process worker on it)

With `device_calibrate`, the `run` flow first has the device calibrate the hardware's profile (the profile
comes back through the tracking store) and plans with it. With `device_measure`, it sends each executed candidate to that pool (`run_deployment`) after
tracking it: the artifact travels through the MLflow artifact store (the worker downloads the candidate's
`model.pt2` from its nested run), the worker measures the latency in the form that runs it fast and logs
`meas.latency_ms` and `err.latency_ms` into that run; the flow waits, reads them back and reports them. When
no worker answers within the timeout, the run says so and keeps the predictions. The worker also keeps the
candidate's ONNX export on the device (DEVICE_ARTIFACTS, for TensorRT: `trtexec --onnx=...`) and logs where
(`deployfit.device_onnx`), which the run's report names.

A fetched `model.pt2` that needs pickle to load is refused (estimators.pt2) unless the worker was started with
`--trust-pickle`: the decision is the device owner's, passed to the flow runs in the worker's environment
(TRUST_ENV), not a parameter the requesting flow could set.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from prefect import flow

from estimators.defaults import CALIBRATION_BUDGET_S

REPO = Path(__file__).resolve().parents[1]
TRUST_ENV = "DEPLOYFIT_WORKER_TRUST_PICKLE"  # "1": this worker loads fetched .pt2 artifacts that need pickle
DEVICE_ARTIFACTS = "device-artifacts"  # under the device's cache ($DEPLOYFIT_CACHE_DIR): one folder per MLflow run


def pool_name(hardware: str) -> str:
    return f"deployfit-{hardware}"


@flow(name="deployfit-measure", log_prints=True)
def measure_flow(run_id: str, tracking_uri: str, batch_size: int = 1) -> dict:
    """Download an executed candidate's artifact from its MLflow run, measure its latency here, and log the
    measurement into that run."""
    import tempfile

    from estimators.report import rel_err
    from hardware.measure import steady_allocator
    from tasks.apply import saved_latency

    from . import tracking

    steady_allocator()
    with tempfile.TemporaryDirectory() as tmp:
        files = tracking.download(tracking_uri, run_id, ["model.pt2", "result.json"], tmp)
        result = json.loads(Path(files["result.json"]).read_text())
        lat = saved_latency(files["model.pt2"], result["strategy"], result["input_shape"], batch_size,
                            trust_pickle=os.environ.get(TRUST_ENV) == "1")
    measured = {"latency_ms": round(lat["latency_ms"], 4)}
    meas = {"meas.latency_ms": measured["latency_ms"],
            **{f"err.{k}": v for k, v in rel_err(result["pred"], measured).items()}}
    onnx = fetch_onnx(tracking_uri, run_id) if (result.get("onnx") or {}).get("path") else None
    tags = {"deployfit.measured_on": socket.gethostname(), **({"deployfit.device_onnx": str(onnx)} if onnx else {})}
    tracking.log_measurement(tracking_uri, run_id, meas, tags)
    print(f"measured {result['compact']}: {meas['meas.latency_ms']} ms on {socket.gethostname()}"
          + (f"; its ONNX export is at {onnx} ({result['onnx'].get('trtexec', '')})" if onnx else ""))
    return {**meas, "p90_ms": lat.get("latency_p90_ms"), "runs": lat.get("latency_runs"), "host": socket.gethostname(),
            "onnx": str(onnx) if onnx else None}


def fetch_onnx(tracking_uri: str, run_id: str) -> Path | None:
    """The candidate's ONNX export (its run's `onnx-model`), kept on this device under DEVICE_ARTIFACTS/RUN_ID;
    None where the run has none."""
    from hardware.hostprofile import cache_dir

    from . import tracking

    dest = cache_dir() / DEVICE_ARTIFACTS / run_id
    dest.mkdir(parents=True, exist_ok=True)
    try:
        path = tracking.download_model(tracking_uri, run_id, "onnx-model", dest) / "model.onnx"
    except Exception as exc:  # noqa: BLE001 - the export is a convenience on top of the measurement
        print(f"no ONNX export fetched for run {run_id}: {type(exc).__name__}: {str(exc)[:200]}")
        return None
    return path if path.is_file() else None


@flow(name="deployfit-calibrate-device", log_prints=True)
def calibrate_device_flow(hardware: str, tracking_uri: str, quick: bool = False, budget_s: float = CALIBRATION_BUDGET_S,
                          int8: bool = True) -> str:
    """Calibrate this machine (the device) as profile `hardware` and log the profile to the tracking store
    (experiment deployfit/calibration/<hardware>, artifact profile.yaml); returns the MLflow run id."""
    import tempfile

    from hardware.calibrate import calibrate_host
    from tasks.quantize_exec import compiled_int8
    from hardware.profile import save_profile

    from . import tracking

    prof = calibrate_host(quick=quick, budget_s=budget_s, int8=int8, progress=print, build_int8=compiled_int8)
    prof = prof.model_copy(update={"name": hardware,
                                   "description": f"{hardware}, calibrated on {socket.gethostname()}: {prof.description}"})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "profile.yaml"
        save_profile(prof, path)
        return tracking.log_profile(tracking_uri, hardware, path, {"host": socket.gethostname(), "quick": str(quick)})


def calibrate_remote(hardware: str, tracking_uri: str, dest: Path, quick: bool, budget_s: float, timeout_s: float,
                     say=print) -> Path | None:
    """Calibrate the hardware's profile on its device (pool deployfit-<hardware>) and fetch it to `dest`; None
    when no worker is online or none finished within the timeout."""
    from prefect.deployments import run_deployment

    if not online_workers(hardware):
        say(f"no worker online on pool {pool_name(hardware)}: the stored {hardware} profile is used")
        return None
    fr = run_deployment(f"deployfit-calibrate-device/{hardware}", parameters={
        "hardware": hardware, "tracking_uri": tracking_uri, "quick": quick, "budget_s": budget_s},
        timeout=timeout_s, poll_interval=2, as_subflow=False)
    if fr.state is None or not fr.state.is_completed():
        say(f"no worker on pool {pool_name(hardware)} finished calibrating within {timeout_s:.0f} s; the stored "
            f"{hardware} profile is used")
        return None
    from . import tracking

    return tracking.fetch_profile(tracking_uri, hardware, dest)


async def _ensure_pool(hardware: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    async with get_client() as client:
        try:
            await client.read_work_pool(pool_name(hardware))
        except ObjectNotFound:
            try:
                await client.create_work_pool(WorkPoolCreate(name=pool_name(hardware), type="process",
                                                             description=f"deployfit measurements on {hardware}"))
            except ObjectAlreadyExists:
                pass


def register(hardware: str) -> str:
    """The pool `deployfit-<hardware>` and the deployment `deployfit-measure/<hardware>` on it (code from this
    checkout: a process worker runs it where deployfit is installed)."""
    asyncio.run(_ensure_pool(hardware))
    measure_flow.from_source(source=str(REPO), entrypoint="flows/device.py:measure_flow").deploy(
        name=hardware, work_pool_name=pool_name(hardware), build=False, push=False, print_next_steps=False,
        description=f"measure an executed candidate's latency on {hardware}")
    calibrate_device_flow.from_source(source=str(REPO), entrypoint="flows/device.py:calibrate_device_flow").deploy(
        name=hardware, work_pool_name=pool_name(hardware), build=False, push=False, print_next_steps=False,
        description=f"calibrate the {hardware} profile on the device")
    return f"deployfit-measure/{hardware}"


def start_worker(hardware: str, env: dict | None = None, trust_pickle: bool = False, **popen) -> subprocess.Popen:
    """`prefect worker start` on the hardware's pool (deployment registered first). `trust_pickle`: its flow runs
    load fetched artifacts that need pickle (refused otherwise)."""
    register(hardware)
    cmd = [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", pool_name(hardware), "--type",
           "process", "--name", f"deployfit-{hardware}-{socket.gethostname()}"]
    return subprocess.Popen(cmd, env={**os.environ, **(env or {}), TRUST_ENV: "1" if trust_pickle else "0"}, **popen)


async def _online_workers(hardware: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            workers = await client.read_workers_for_work_pool(pool_name(hardware))
        except ObjectNotFound:
            return []
    return [w.name for w in workers if str(getattr(w.status, "value", w.status)).upper() == "ONLINE"]


def online_workers(hardware: str) -> list[str]:
    """Workers of the hardware's pool that the Prefect API currently sees as online."""
    return asyncio.run(_online_workers(hardware))


def measure_remote(executed_runs: list[str], tracking_uri: str, hardware: str, batch_size: int, timeout_s: float,
                   say=print) -> list[dict | None]:
    """Send each executed candidate (its MLflow run) to the hardware's pool and wait for the measurement;
    None for those no worker finished within the timeout."""
    from prefect.deployments import run_deployment

    if not online_workers(hardware):
        say(f"no worker online on pool {pool_name(hardware)}: latency stays predicted (start `deployfit worker "
            f"--hardware {hardware}` on the device)")
        return [None] * len(executed_runs)
    out: list[dict | None] = []
    for rid in executed_runs:
        try:
            fr = run_deployment(f"deployfit-measure/{hardware}", parameters={"run_id": rid, "tracking_uri": tracking_uri,
                                                                             "batch_size": batch_size},
                                timeout=timeout_s, poll_interval=2, as_subflow=False)
        except Exception as exc:  # no such deployment: nobody registered a worker for this hardware
            say(f"no measurement deployment for {hardware} ({type(exc).__name__}: {exc}); start `deployfit worker "
                f"--hardware {hardware}` on the device")
            out.append(None)
            continue
        if fr.state is None or not fr.state.is_completed():
            say(f"no worker on pool {pool_name(hardware)} finished measuring within {timeout_s:.0f} s "
                f"(flow run {fr.id}, state {fr.state.name if fr.state else 'none'}); predictions kept")
            out.append(None)
            continue
        from . import tracking

        got, tags = tracking.read_run(tracking_uri, rid, ("meas.latency_ms", "err.latency_ms"),
                                      ("deployfit.device_onnx",))
        out.append({**got, **({"device_onnx": tags["deployfit.device_onnx"]} if tags else {})})
    return out
