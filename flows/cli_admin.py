"""The administrative `deployfit` commands: serving deployments and the UIs, syncing a run kept locally, the
device worker, the shared stores, hardware profiles and calibration."""
from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from estimators.defaults import CALIBRATION_BUDGET_S, INT8_LEAST_NETWORKS, ORT_CALIBRATION_S, QUICK_CALIBRATION_S
from estimators.errors import UserInputError
from flows.cli_common import (
    app, console, progress, warn, fail, compute, JsonOpt, HardwareReq)


@app.command(short_help="Serve the deployments of prefect.yaml.")
def serve(file: Annotated[str, typer.Option("--file", help="deployments file")] = "prefect.yaml") -> None:
    """Serve the deployments of prefect.yaml (schedules included) so the Prefect UI can trigger them; runs
    until interrupted."""
    from flows.deployments import serve_deployments

    try:
        serve_deployments(file, say=lambda m: console.print(m, highlight=False))
    except UserInputError as exc:
        fail(str(exc), False)


@app.command(short_help="Start the Prefect and MLflow UIs on loopback.")
def ui(prefect_port: Annotated[int, typer.Option("--prefect-port", help="the Prefect server's port")] = 4200,
       mlflow_port: Annotated[int, typer.Option("--mlflow-port", help="the MLflow server's port")] = 5000) -> None:
    """Start a Prefect server and an MLflow server on 127.0.0.1 over the same stores the flows use, print
    both URLs, and run until interrupted."""
    from flows.deployments import start_uis

    try:
        start_uis(prefect_port, mlflow_port, say=lambda m: console.print(m, highlight=False))
    except UserInputError as exc:
        fail(str(exc), False)


@app.command(short_help="Push a run kept locally into MLflow.")
def sync(folder: Annotated[str, typer.Argument(help="a run's tracking-fallback folder (RUN_DIR/tracking-fallback)")],
         as_json: JsonOpt = False) -> None:
    """Push a run kept locally while the tracking store was unreachable into MLflow (MLFLOW_TRACKING_URI, else
    mlflow/mlflow.db); a folder already pushed is not logged twice."""

    def body():
        from flows.tracking import sync_local

        return sync_local(folder)

    rep = compute(as_json, body)
    if not as_json:
        console.print(("already in the store as run " if rep["already"] else "logged as run ") + rep["run_id"]
                      + (f": {rep['link']}" if rep.get("link") else ""), highlight=False)


@app.command(short_help="Run a device worker on the hardware's work pool.")
def worker(hardware: HardwareReq,
           trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="load fetched model.pt2 artifacts that "
                                                      "need pickle (refused otherwise: unpickling can run any code)")
                                   ] = False) -> None:
    """On the device: create the work pool deployfit-HARDWARE if needed, register the deployfit-measure/HARDWARE
    deployment and run a Prefect process worker on it (needs PREFECT_API_URL and MLFLOW_TRACKING_URI pointing at
    the shared servers); runs until interrupted."""
    from flows.device import start_worker

    p = start_worker(hardware, trust_pickle=trust_pickle)
    console.print(f"worker on pool deployfit-{hardware}; Ctrl-C stops it", highlight=False)
    try:
        p.wait()
    except KeyboardInterrupt:
        p.terminate()
        p.wait(30)


stores_app = typer.Typer(rich_markup_mode=None, short_help="Shared PostgreSQL, Prefect and MLflow stores.", help="Shared stores: PostgreSQL, a Prefect server and an MLflow server on it (loopback).",
                         no_args_is_help=True)
app.add_typer(stores_app, name="stores")


@stores_app.command("up")
def stores_up(folder: Annotated[str, typer.Option("--dir", help="cluster, logs and MLflow artifacts")] = "build/stores",
              pg_port: Annotated[int, typer.Option("--pg-port", help="PostgreSQL's port")] = 5433,
              prefect_port: Annotated[int, typer.Option("--prefect-port", help="the Prefect server's port")] = 4200,
              mlflow_port: Annotated[int, typer.Option("--mlflow-port", help="the MLflow server's port")] = 5000) -> None:
    """Start PostgreSQL (Debian's postgresql package) on 127.0.0.1, the Prefect server and the MLflow server on
    it, print the variables every user sets, and run until interrupted (then stop all three)."""
    import time as _time

    from flows.stores import up

    try:
        st = up(folder, pg_port, prefect_port, mlflow_port, say=lambda m: console.print(m, highlight=False))
    except UserInputError as exc:
        fail(str(exc), False)
    try:
        while all(p.poll() is None for p in st.procs):
            _time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        st.stop()


hardware_app = typer.Typer(rich_markup_mode=None, short_help="List and show hardware profiles.", help="Hardware profiles: `host` (this machine, kept in the cache) and the shipped "
                           "hardware/profiles/*.yaml.", no_args_is_help=True)
app.add_typer(hardware_app, name="hardware")


@hardware_app.command("list")
def hardware_list(as_json: JsonOpt = False) -> None:
    """List the hardware profiles and the runtime each predicts."""

    def body():
        from hardware.hostprofile import describe, host_calibrated, host_key
        from hardware.profile import list_profiles, load_profile

        path = host_calibrated()
        host = {"name": "host", "runtime": f"this machine: {describe(host_key())}; "
                + (f"calibrated ({path})" if path else "not calibrated yet (calibrated at first use)")}
        return {"profiles": [host] + [{"name": n, "runtime": load_profile(n).runtime} for n in list_profiles()
                                      if n != "host"]}

    rep = compute(as_json, body)
    if not as_json:
        t = Table(title="hardware profiles")
        t.add_column("name")
        t.add_column("runtime")
        for p in rep["profiles"]:
            t.add_row(p["name"], p["runtime"])
        console.print(t)


@hardware_app.command("show")
def hardware_show(name: Annotated[str, typer.Argument(help="profile name or YAML path")], as_json: JsonOpt = False) -> None:
    """Show one profile with its sources."""

    def body():
        from hardware.hostprofile import foreign_note, profile_hash
        from hardware.profile import load_profile

        prof = load_profile(name, progress=progress)
        note = foreign_note(prof)
        return {**prof.model_dump(exclude_none=True), "hash": profile_hash(prof), **({"warning": note} if note else {})}

    rep = compute(as_json, body)
    if not as_json:
        import yaml

        note = rep.pop("warning", None)
        console.print(yaml.safe_dump(rep, sort_keys=False, width=110), highlight=False)
        if note:
            warn(note)


@app.command(short_help="Calibrate this machine's host profile.")
def calibrate(
    hardware: Annotated[str, typer.Option("--hardware", help="only `host` (this machine) can be calibrated here")] = "host",
    out: Annotated[Optional[str], typer.Option("--out", help="profile path (default: this machine's host profile in "
                                               "the cache, $DEPLOYFIT_CACHE_DIR/profiles)")] = None,
    quick: Annotated[bool, typer.Option("--quick", help=f"about {QUICK_CALIBRATION_S:.0f} s in all: fewer synthetic "
                                        "networks (what a first use of `host` runs)")] = False,
    int8: Annotated[bool, typer.Option("--int8/--no-int8", help="also calibrate the compiled INT8 path")] = True,
    budget: Annotated[Optional[float], typer.Option(
        "--budget", help=f"seconds of timing (peaks and set-up come on top; default {CALIBRATION_BUDGET_S:.0f}, "
                         f"with --runtime onnxruntime {ORT_CALIBRATION_S:.0f}; a full INT8 calibration compiles at "
                         f"least {INT8_LEAST_NETWORKS} INT8 networks whatever the budget)")] = None,
    keep_samples: Annotated[Optional[str], typer.Option(
        "--keep-samples", help="also save what this calibration timed here (an npz of data only, for --pool "
                               "later)")] = None,
    pool: Annotated[Optional[str], typer.Option(
        "--pool", help="comma-separated samples of earlier calibrations of this machine (--keep-samples): fitted "
                       "together with this run's")] = None,
    refit: Annotated[bool, typer.Option("--refit", help="time nothing: fit the --pool samples alone")] = False,
    runtime: Annotated[str, typer.Option("--runtime", metavar="RUNTIME", help="pytorch (the host profile) or "
                                         "onnxruntime (this machine's profile for ONNX Runtime, fitted on top of the "
                                         "host profile: about 2.5 minutes, --quick 1)")] = "pytorch",
    as_json: JsonOpt = False,
) -> None:
    """Fit the host profile to operators timed inside synthetic networks on this machine (about 3 minutes
    on 2 cores, at least six compiled INT8 networks among them) and write it with its provenance. Calibrations of
    one machine can be pooled (--keep-samples, then --pool): more compiled INT8 networks and operators per fit, at
    about 3 minutes a run. With --runtime onnxruntime, fit this machine's ONNX Runtime profile instead: synthetic
    networks exported to ONNX (float and INT8 QDQ) and timed whole in ONNX Runtime."""

    def body():
        from pathlib import Path

        from hardware.calibrate import collect_samples, fit_profile, load_samples, merge_samples, save_samples
        from hardware.hostprofile import host_profile_path
        from hardware.profile import save_profile
        from tasks.quantize_exec import compiled_int8

        if hardware != "host":
            raise UserInputError(f"only the host can be calibrated from here, not {hardware!r}")
        if budget is not None and budget <= 0:
            raise UserInputError(f"--budget must be positive seconds, not {budget}")
        if runtime == "onnxruntime":
            return _calibrate_ort(out, quick, int8, budget, pool, keep_samples, refit)
        if runtime != "pytorch":
            raise UserInputError(f"unknown runtime {runtime!r}: choose from pytorch, onnxruntime")
        if refit and not pool:
            raise UserInputError("--refit fits earlier samples: name them with --pool")
        if refit and keep_samples:
            raise UserInputError("--refit times nothing: there are no new samples to keep")
        earlier = []
        for p in (pool.split(",") if pool else []):
            if not Path(p.strip()).is_file():
                raise UserInputError(f"--pool: no such samples file {p.strip()!r}")
            try:
                earlier.append(load_samples(p.strip()))
            except ValueError as e:
                raise UserInputError(str(e)) from e
        runs = earlier
        if not refit:
            new = collect_samples(quick=quick, progress=progress, int8=int8,
                                  budget_s=CALIBRATION_BUDGET_S if budget is None else budget, after=earlier,
                                  build_int8=compiled_int8)
            if keep_samples:
                save_samples(new, keep_samples)
                progress(f"samples saved to {keep_samples}")
            runs = [new] + earlier
        try:
            samples = merge_samples(runs)
        except ValueError as e:
            raise UserInputError(f"--pool: {e}") from e
        prof = fit_profile(samples, progress)
        path = Path(out) if out else host_profile_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_profile(prof, path)
        return {"profile": str(path), "provenance": prof.provenance.model_dump() if prof.provenance else None}

    rep = compute(as_json, body)
    if not as_json:
        console.print(f"wrote {rep['profile']} in {rep['provenance']['fit']['seconds']} s")


def _calibrate_ort(out: str | None, quick: bool, int8: bool, budget: float | None, pool: str | None,
                   keep_samples: str | None, refit: bool) -> dict:
    """`calibrate --runtime onnxruntime`: this machine's ONNX Runtime profile (tasks.onnx_runtime.calibrate_ort),
    written to `out` or beside the host profile in the cache."""
    from pathlib import Path

    from hardware.profile import save_profile
    from tasks.onnx_runtime import calibrate_ort, ort_profile_path

    if pool or keep_samples or refit:
        raise UserInputError("--pool, --keep-samples and --refit pool PyTorch calibrations: not with --runtime "
                             "onnxruntime")
    prof = calibrate_ort(quick=quick, progress=progress, int8=int8, budget_s=budget)
    path = Path(out) if out else ort_profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_profile(prof, path)
    fit = prof.provenance.fit
    progress(f"fit: float networks {100 * fit['fp32.mape']:.1f}% in sample"
             + (f", {100 * fit['fp32.left_out_mape']:.1f}% left out" if "fp32.left_out_mape" in fit else "")
             + (f"; INT8 QDQ {100 * fit['int8.mape']:.1f}% in sample" if "int8.mape" in fit else "")
             + (f", {100 * fit['int8.left_out_mape']:.1f}% left out" if "int8.left_out_mape" in fit else ""))
    return {"profile": str(path), "provenance": prof.provenance.model_dump()}
