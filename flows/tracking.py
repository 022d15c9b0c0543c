"""MLflow tracking: the only module that imports mlflow.

One experiment per model and hardware (`deployfit/<model>/<hardware>`); one parent run per flow run
(params: model, hardware, data, requirements, search options; tag `prefect.flow_run_id`) holding the whole
candidate space as a table artifact (`candidates.json`), the layer table, the plan report and a Pareto plot;
one nested run per Pareto-front point (`pred.*`) and per executed candidate (`pred.*`, `meas.*`, `err.*`,
strategy.json and the compressed model).

Store: `MLFLOW_TRACKING_URI` when set, else the SQLite store under mlflow/ (artifacts in mlflow/artifacts),
which `deployfit ui` serves. When the store cannot be reached, `save_local` writes the same content under a
folder and the flow says where: nothing is lost.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from estimators.strategy import parse_strategy

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DB = REPO / "mlflow" / "mlflow.db"
DEFAULT_ARTIFACTS = REPO / "mlflow" / "artifacts"
PARETO_RUNS = 25  # nested runs for the front (the whole front is in pareto.json and candidates.json)


def prefetch() -> None:
    """Import mlflow and matplotlib in a background thread while the flow computes (about 1.5 s of imports
    that would otherwise wait until tracking)."""
    import threading

    def go():
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot  # noqa: F401
            import mlflow.tracking  # noqa: F401
        except Exception:  # tracking reports its own errors later
            pass

    threading.Thread(target=go, name="deployfit-prefetch", daemon=True).start()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"


def _is_local_db(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store live beside its database file (mlflow/artifacts for the default store),
    never in the working directory; a tracking server decides its own."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    return (db.parent / "artifacts" / re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment)).resolve().as_uri()


def ui_link(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI page of a run: on the tracking server itself, or on `deployfit ui`'s local server."""
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def _metrics(prefix: str, d: dict | None) -> dict[str, float]:
    return {f"{prefix}.{k}": float(v) for k, v in (d or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _flat(prefix: str, d: dict) -> dict[str, str]:
    return {f"{prefix}.{k}": str(v) for k, v in d.items() if v is not None}


def pareto_plot(plan: dict, executed: list[dict], path: Path) -> Path:
    """Predicted latency against predicted accuracy drop for the front; executed candidates marked at their
    predicted and measured points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    front = plan.get("pareto", [])
    if front:
        ax.scatter([p["pred"]["latency_ms"] for p in front], [p["pred"]["accuracy_drop"] for p in front], s=10,
                   c="#7aa6c2", label=f"Pareto front, predicted ({len(front)})")
    for i, e in enumerate(executed):
        p, m = e["pred"], e["meas"]
        if "latency_ms" in p and "accuracy_drop" in p:
            ax.scatter([p["latency_ms"]], [p["accuracy_drop"]], marker="o", facecolors="none", edgecolors="#c0392b",
                       s=60, label="executed, predicted" if i == 0 else None)
        if "latency_ms" in m and "accuracy_drop" in m:
            ax.scatter([m["latency_ms"]], [m["accuracy_drop"]], marker="x", c="#c0392b", s=60,
                       label="executed, measured" if i == 0 else None)
            if "latency_ms" in p and "accuracy_drop" in p:
                ax.plot([p["latency_ms"], m["latency_ms"]], [p["accuracy_drop"], m["accuracy_drop"]], c="#c0392b",
                        lw=0.6, alpha=0.6)
    unit = "points" if plan.get("accuracy_unit") == "points" else "proxy"
    ax.set_xlabel(f"latency on {plan.get('hardware')} (ms)")
    ax.set_ylabel(f"accuracy drop ({unit})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _pareto_subset(front: list[dict], n: int = PARETO_RUNS) -> list[dict]:
    if len(front) <= n:
        return front
    by_lat = sorted(front, key=lambda p: p["pred"]["latency_ms"])
    idx = sorted({round(i * (len(by_lat) - 1) / (n - 1)) for i in range(n)})
    return [by_lat[i] for i in idx]


def write_bundle(folder: Path, record: dict, plan: dict, executed: list[dict], layers: list[dict]) -> Path:
    """Everything a run logs, as files: record.json (params, tags), plan.json, candidates.json, layers.json,
    pareto.png and per executed candidate its strategy and result."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "record.json").write_text(json.dumps(record, indent=1, default=str))
    (folder / "plan.json").write_text(json.dumps({k: v for k, v in plan.items() if k != "candidates"}, default=str))
    (folder / "candidates.json").write_text(json.dumps(plan.get("candidates", {}), default=str))
    (folder / "layers.json").write_text(json.dumps(layers, default=str))
    pareto_plot(plan, executed, folder / "pareto.png")
    for i, e in enumerate(executed):
        sub = folder / f"executed-{i}"
        sub.mkdir(exist_ok=True)
        strategy = e.get("strategy") or parse_strategy(e["compact"]).model_dump(exclude_none=True)
        (sub / "strategy.json").write_text(json.dumps(strategy, indent=1))
        (sub / "result.json").write_text(json.dumps({k: v for k, v in e.items() if k != "log"}, default=str))
    return folder


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # stdout carries --json's one object
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, uri: str, name: str) -> str:
    """The experiment `name`, created (artifacts placed by artifact_location) when missing."""
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name, artifact_location=artifact_location(uri, name))


def log_run(record: dict, plan: dict, executed: list[dict], layers: list[dict], workdir: Path) -> dict[str, Any]:
    """Log a flow run to MLflow. Raises when the store cannot be reached (the caller keeps a local copy)."""
    from mlflow.entities import Metric, Param, RunTag

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a down server fails in seconds, not minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    uri = tracking_uri()
    client = _client(uri)
    exp_id = _experiment_id(client, uri, f"deployfit/{record['model']}/{record['hardware']}")
    bundle = write_bundle(workdir / "tracking-bundle", record, plan, executed, layers)
    tags = {"prefect.flow_run_id": record.get("flow_run_id") or "", "deployfit.flow": record.get("flow", ""),
            "mlflow.runName": record.get("run_name") or f"{record['flow']} {record['model']}"}
    parent = client.create_run(exp_id, tags=tags)
    pid = parent.info.run_id
    params = {"model": record["model"], "hardware": record["hardware"], "data": record.get("data") or "none",
              **_flat("req", record.get("requirements", {})), **_flat("search", record.get("search", {}))}
    client.log_batch(pid, params=[Param(k, v[:6000]) for k, v in params.items()])
    summary = {"candidates_evaluated": plan.get("candidates_evaluated", 0), "search_seconds": plan.get("seconds", 0.0),
               "candidates_per_second": plan.get("candidates_per_second", 0.0), "pareto_points": len(plan.get("pareto", []))}
    if plan.get("recommended"):
        summary.update(_metrics("pred", plan["recommended"]["pred"]))
    client.log_batch(pid, metrics=[Metric(k, v, 0, 0) for k, v in summary.items()])
    cands = plan.get("candidates") or {}
    if cands:
        client.log_table(pid, cands, "candidates.json")
    for f in ("plan.json", "layers.json", "pareto.png", "record.json"):
        client.log_artifact(pid, str(bundle / f))
    nested = []

    def child(kind: str, row: dict, extra_metrics: dict, files: list[Path]) -> str:
        r = client.create_run(exp_id, tags={"mlflow.parentRunId": pid, "mlflow.runName": f"{kind}: {row.get('label', row['compact'])}"[:250],
                                            "deployfit.kind": kind, "prefect.flow_run_id": tags["prefect.flow_run_id"]})
        rid = r.info.run_id
        client.log_batch(rid, metrics=[Metric(k, v, 0, 0) for k, v in {**_metrics("pred", row["pred"]), **extra_metrics}.items()],
                         params=[Param("strategy", row["compact"][:6000])],
                         tags=[RunTag("deployfit.label", row.get("label", row["compact"])[:5000])])
        for f in files:
            client.log_artifact(rid, str(f))
        client.set_terminated(rid)
        return rid

    for p in _pareto_subset(plan.get("pareto", [])):
        nested.append(child("pareto", p, {}, []))  # the strategy is the run's `strategy` param
    executed_runs = []
    for i, e in enumerate(executed):
        sub = bundle / f"executed-{i}"
        files = [sub / "strategy.json", sub / "result.json"]
        model_file = (e.get("artifact") or {}).get("model")
        if model_file and Path(model_file).is_file():
            files.append(Path(model_file))
        nested.append(child("executed", {**e, "label": e.get("label", e["compact"])},
                            {**_metrics("meas", e.get("meas")), **_metrics("err", e.get("err"))}, files))
        executed_runs.append(nested[-1])
    client.set_terminated(pid)
    return {"uri": uri, "experiment_id": exp_id, "run_id": pid, "nested_runs": len(nested),
            "executed_runs": executed_runs, "link": ui_link(uri, exp_id, pid)}


def save_local(folder: Path, record: dict, plan: dict, executed: list[dict], layers: list[dict], error: str) -> dict:
    """The fallback when the tracking store is down: the run's whole content as files under `folder`."""
    write_bundle(folder, {**record, "tracking_error": error}, plan, executed, layers)
    for i, e in enumerate(executed):
        model_file = (e.get("artifact") or {}).get("model")
        if model_file and Path(model_file).is_file():
            shutil.copy2(model_file, folder / f"executed-{i}" / Path(model_file).name)
    return {"uri": tracking_uri(), "saved_locally": str(folder), "error": error}


def download(uri: str, run_id: str, names: list[str], dest: str) -> dict[str, str]:
    """Artifacts of a run, downloaded from the tracking store (how a device worker receives a candidate)."""
    client = _client(uri)
    return {n: client.download_artifacts(run_id, n, dest) for n in names}


def log_measurement(uri: str, run_id: str, metrics: dict[str, float], tags: dict[str, str]) -> None:
    from mlflow.entities import Metric, RunTag

    _client(uri).log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
                           tags=[RunTag(k, v) for k, v in tags.items()])


def read_metrics(uri: str, run_id: str, names: tuple[str, ...]) -> dict[str, float]:
    m = _client(uri).get_run(run_id).data.metrics
    return {k: m[k] for k in names if k in m}


def log_profile(uri: str, hardware: str, path: Path, params: dict[str, str]) -> str:
    """A device-calibrated profile, as artifact profile.yaml of a run in experiment deployfit/calibration/<hw>."""
    from mlflow.entities import Param

    client = _client(uri)
    exp_id = _experiment_id(client, uri, f"deployfit/calibration/{hardware}")
    run = client.create_run(exp_id, tags={"mlflow.runName": f"calibrate {hardware}", "deployfit.kind": "calibration"})
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def fetch_profile(uri: str, hardware: str, dest: Path) -> Path | None:
    """The newest device-calibrated profile of `hardware` from the tracking store, copied to `dest`."""
    client = _client(uri)
    exp = client.get_experiment_by_name(f"deployfit/calibration/{hardware}")
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    got = Path(client.download_artifacts(runs[0].info.run_id, "profile.yaml", str(dest)))
    final = dest / f"{hardware}.yaml"
    got.replace(final)
    return final
