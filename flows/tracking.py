"""MLflow tracking: the only module that imports mlflow.

One experiment per model and hardware (`deployfit/<model>/<hardware>`); one parent run per flow run
(params: model, hardware, data, requirements, search options, the profile's identity `profile.*` and the latency's
basis and anchor `latency.basis`, `anchor.*`; tags `prefect.flow_run_id` and, for a profile calibrated on another
machine, `deployfit.profile_warning`) holding the whole
candidate space as a table artifact (`candidates.json`), the layer table, the plan report and a Pareto plot;
one nested run per Pareto-front point (`pred.*`) and per executed candidate (`pred.*`, `meas.*`, `err.*`,
strategy.json and the compressed model).

A flow logs through a `Session`: a background process (nice 19) that opens the store while the flow
analyses, logs the plan while the candidates execute and each executed candidate as it is built, so that
the flow's end waits only for the measured latencies and the plot. `log_run` logs a whole run in one go
(the `track` task's retry).

Store: `MLFLOW_TRACKING_URI` when set, else the SQLite store under mlflow/ (artifacts in mlflow/artifacts),
which `deployfit ui` serves. When the store cannot be reached, `save_local` writes the same content under a
folder and the flow says where: nothing is lost.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from estimators.strategy import parse_strategy

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DB = REPO / "mlflow" / "mlflow.db"
DEFAULT_ARTIFACTS = REPO / "mlflow" / "artifacts"
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"  # the UI opens it on runs, not GenAI traces
# MLflow 3's UI shows its GenAI views unless told otherwise (a switch kept per browser): every link says model training
ML_VIEW = "workflowType=machine_learning"
PARETO_RUNS = 25  # nested runs for the front (the whole front is in pareto.json and candidates.json)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"


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
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{ML_VIEW}"


def _metrics(prefix: str, d: dict | None) -> dict[str, float]:
    return {f"{prefix}.{k}": float(v) for k, v in (d or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def err_metrics(e: dict) -> dict[str, float]:
    """An executed candidate's errors as MLflow metrics: `err.K` is always relative, (pred - meas) / meas; a metric
    in percentage points (accuracy, accuracy drop) also has its difference in points as `err.K_points` (an
    accuracy drop near zero has no meaningful relative error, so it has the points only)."""
    from estimators.report import POINTS

    pred, meas, out = e.get("pred") or {}, e.get("meas") or {}, {}
    for k, v in (e.get("err") or {}).items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if k in POINTS:
            out[f"err.{k}_points"] = float(v)
            if k != "accuracy_drop" and meas.get(k) and k in pred:
                out[f"err.{k}"] = (float(pred[k]) - float(meas[k])) / float(meas[k])
        else:
            out[f"err.{k}"] = float(v)
    return out


def run_name(record: dict, plan: dict) -> str:
    """The parent run's name: the flow run's (model, hardware, time, or the name it was triggered with) and the
    recommended strategy."""
    base = record.get("run_name") or f"{record['model']} on {record['hardware']}"
    rec = plan.get("recommended")
    return f"{base}: {rec['label'] if rec else 'infeasible'}"[:250]


def child_name(kind: str, row: dict) -> str:
    """A nested run's name: its kind, a short hash of the full strategy (labels of per-layer strategies
    abbreviate, so two can read alike) and the readable label."""
    import hashlib

    h = hashlib.sha256(row["compact"].encode()).hexdigest()[:6]
    return f"{kind} {h}: {row.get('label', row['compact'])}"[:250]


def description(record: dict, plan: dict) -> str:
    """The parent run's description (markdown): what is recommended and why, and what the latency rests on."""
    rec = plan.get("recommended")
    lines = [f"**{record['flow']}** `{record['model']}` on `{record['hardware']}`, data `{record.get('data')}`."]
    if rec:
        binding = ", ".join(b["requirement"] for b in plan.get("binding") or []) or "none"
        lines.append(f"**Recommended:** `{rec['label']}` (`{rec['compact']}`), the least predicted accuracy drop "
                     f"among those meeting every requirement; binding requirements: {binding}.")
    elif plan.get("infeasible"):
        lines.append(f"**Infeasible:** {plan['infeasible'].get('message', '')}")
    req = record.get("requirements") or {}
    lines.append("Requirements: " + (", ".join(f"{k} = {v}" for k, v in req.items()) or "none") + ".")
    ident = plan.get("profile_identity") or {}
    prof, anchor = ident.get("profile") or {}, ident.get("anchor")
    if prof:
        lines.append(f"Latency: profile `{prof.get('name')}` (hash {prof.get('hash')}), "
                     + (f"anchored on the original measured here ({anchor['total_ms']} ms)." if anchor else
                        "the profile alone."))
    return "\n\n".join(lines)


def best_executed(executed: list[dict], requirements: dict) -> int | None:
    """The executed candidate a reviewer wants first: of those that meet every requirement as measured, the one
    with the least measured accuracy drop (None where none does)."""
    from search.requirements import Requirements, broken_as_measured

    req = Requirements(**requirements)
    ok = [i for i, e in enumerate(executed) if e.get("meas") and not e.get("error")
          and not broken_as_measured(e["meas"], req)]
    return min(ok, key=lambda i: executed[i]["meas"].get("accuracy_drop", 0.0)) if ok else None


def executed_line(executed: list[dict], runs: dict[int, str], requirements: dict, experiment_id: str) -> str:
    """The parent run's description line that links the best executed candidate's run (markdown link within the
    UI): from the start page, the experiment, the parent run, this link."""
    if not executed:
        return ""
    best = best_executed(executed, requirements)
    if best is None or best not in runs:
        return f"**Executed:** none of the {len(executed)} executed candidates meets every requirement as measured."
    e = executed[best]
    meas = e["meas"]
    parts = [f"accuracy drop {meas['accuracy_drop']:+.2f} points" if "accuracy_drop" in meas else "",
             f"latency {meas['latency_ms']:.3f} ms" if "latency_ms" in meas else "",
             f"size {meas['size_bytes'] / 1e6:.3f} MB" if "size_bytes" in meas else ""]
    return (f"**Best executed:** [{e.get('label', e['compact'])}](#/experiments/{experiment_id}/runs/{runs[best]}?"
            f"{ML_VIEW}) meets every requirement as measured ({', '.join(p for p in parts if p)}); "
            f"{len(executed)} executed.")


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
    for i, e in enumerate(executed):  # each executed point named by its number in the run's executed list
        at = e["meas"] if "latency_ms" in e["meas"] and "accuracy_drop" in e["meas"] else e["pred"]
        if "latency_ms" in at and "accuracy_drop" in at:
            ax.annotate(f"#{i + 1} {e.get('label', e['compact'])}"[:48], (at["latency_ms"], at["accuracy_drop"]),
                        xytext=(5, 4), textcoords="offset points", fontsize=7, color="#7b241c")
    req = plan.get("requirements") or {}
    if req.get("max_latency_ms") is not None:
        ax.axvline(req["max_latency_ms"], color="#555555", ls="--", lw=0.9,
                   label=f"max latency {req['max_latency_ms']} ms")
    if req.get("max_accuracy_drop") is not None:
        ax.axhline(req["max_accuracy_drop"], color="#555555", ls=":", lw=0.9,
                   label=f"max accuracy drop {req['max_accuracy_drop']}")
    unit = "points" if plan.get("accuracy_unit") == "points" else "proxy"
    rec = plan.get("recommended")
    ax.set_title(f"{plan.get('model', '')} on {plan.get('hardware')}: {plan.get('candidates_evaluated', 0):,} "
                 "candidates" + (f"\nrecommended {rec['label']}"[:90] if rec else "; none meets every requirement"),
                 fontsize=9)
    ax.set_xlabel(f"latency on {plan.get('hardware')} (ms)")
    ax.set_ylabel(f"accuracy drop ({unit})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _columns(rows: list[dict]) -> dict[str, list]:
    """Rows as an MLflow table (columns of values): numbers stay numbers, so the UI sorts them as numbers; nested
    values become JSON text."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = {}
    for k in keys:
        col = [r.get(k) for r in rows]
        if any(isinstance(v, (dict, list, tuple)) for v in col):
            col = [None if v is None else json.dumps(v, default=str) for v in col]
        out[k] = col
    return out


def prefect_link(flow_run_id: str | None) -> str | None:
    """The Prefect UI page of a flow run, where the API is a server (a temporary one has no UI: `deployfit ui`
    serves its database)."""
    if not flow_run_id:
        return None
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()
    if not ui:
        api = PREFECT_API_URL.value() or ""
        ui = api[:-4] if api.endswith("/api") else "http://127.0.0.1:4200"
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}"


def _pareto_subset(front: list[dict], n: int = PARETO_RUNS) -> list[dict]:
    if len(front) <= n:
        return front
    by_lat = sorted(front, key=lambda p: p["pred"]["latency_ms"])
    idx = sorted({round(i * (len(by_lat) - 1) / (n - 1)) for i in range(n)})
    return [by_lat[i] for i in idx]


def write_bundle(folder: Path, record: dict, plan: dict, executed: list[dict], layers: list[dict],
                 plot: bool = True) -> Path:
    """Everything a run logs, as files: record.json (params, tags), plan.json, candidates.json, layers.json,
    pareto.png (unless `plot` is false) and per executed candidate its strategy and result."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "record.json").write_text(json.dumps(record, indent=1, default=str))
    (folder / "plan.json").write_text(json.dumps({k: v for k, v in plan.items() if k != "candidates"}, default=str))
    (folder / "candidates.json").write_text(json.dumps(plan.get("candidates", {}), default=str))
    (folder / "layers.json").write_text(json.dumps(layers, default=str))
    for i, e in enumerate(executed):
        write_executed(folder, i, e)
    if plot:
        pareto_plot(plan, executed, folder / "pareto.png")
    return folder


def write_executed(folder: Path, i: int, e: dict) -> Path:
    sub = folder / f"executed-{i}"
    sub.mkdir(exist_ok=True)
    strategy = e.get("strategy") or parse_strategy(e["compact"]).model_dump(exclude_none=True)
    (sub / "strategy.json").write_text(json.dumps(strategy, indent=1))
    (sub / "result.json").write_text(json.dumps({k: v for k, v in e.items() if k != "log"}, default=str))
    return sub


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # stdout carries --json's one object
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    # a client of a new (or older) SQLite store creates or migrates its schema as it is built; two processes doing
    # it at once collide and neither run is recorded: one process at a time, under a lock beside the file
    from filelock import FileLock

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock", timeout=300):
        return MlflowClient(tracking_uri=uri)


def _experiment_id(client, uri: str, name: str) -> str:
    """The experiment `name`, created (artifacts placed by artifact_location) when missing."""
    exp = client.get_experiment_by_name(name)
    if exp:
        if exp.tags.get(KIND_TAG) != KIND:  # made by an earlier version: the UI would open it on GenAI traces
            client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri, name), tags={
            KIND_TAG: KIND, "mlflow.note.content": f"deployfit runs of `{name.split('/', 1)[-1]}`: one parent run per "
            "flow run (the recommendation in its description), nested runs for the Pareto front and for each "
            "executed candidate (pred.*, meas.* and err.* = (pred - meas) / meas)."})
    except Exception:  # noqa: BLE001 - another run created it in between: use theirs
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def close_stale_runs(client, exp_id: str) -> list[str]:
    """Parent runs of this machine left RUNNING by a process that no longer exists (a run killed outright cannot
    close its own): marked KILLED. Returns their ids."""
    host = socket.gethostname()
    stale = []
    for run in client.search_runs([exp_id], f"attributes.status = 'RUNNING' and tags.`deployfit.host` = '{host}'"):
        pid = run.data.tags.get("deployfit.pid", "")
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            client.set_terminated(run.info.run_id, "KILLED")
            stale.append(run.info.run_id)
            _crash_flow_run(run.data.tags.get("prefect.flow_run_id", ""), pid)
        except PermissionError:  # alive, another user's
            pass
    return stale


def _crash_flow_run(flow_run_id: str, pid: str) -> None:
    """The Prefect flow run of a killed process, left RUNNING, is set Crashed when this Prefect API holds it (a
    temporary server's runs live in PREFECT_HOME's database, so the next run from the same home sees them)."""
    if not flow_run_id:
        return
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL

    if FlowRunContext.get() is None and not PREFECT_API_URL.value():
        return  # outside a flow with no server named: asking would start a temporary one for nothing
    try:
        from uuid import UUID

        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        with get_client(sync_client=True) as pc:
            fr = pc.read_flow_run(UUID(flow_run_id))
            if fr.state is not None and fr.state.is_running():
                pc.set_flow_run_state(fr.id, Crashed(message=f"its process ({pid}) ended without closing it"),
                                      force=True)
    except Exception:  # noqa: BLE001 - another API's run, or none reachable: the MLflow side is closed anyway
        pass


class _Logger:
    """Logs one flow run in three phases: `start` (parent run, params, the plan's summary, the candidate table,
    plan/layers/record files and the Pareto nested runs), `executed` (one nested run per executed candidate)
    and `finish` (the Pareto plot with the measured points, the parent closed). Raises when the store cannot
    be reached."""

    def __init__(self, uri: str | None = None):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a down server fails in seconds, not minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri = uri or tracking_uri()
        self.client = _client(self.uri)
        self.pid: str | None = None
        self.nested: list[str] = []
        self.executed_runs: dict[int, str] = {}  # executed candidate's index -> its nested run
        self.models: dict[str, str] = {}  # nested run -> the MLflow model logged in it
        self.logged: dict[int, dict[str, float]] = {}  # the metrics logged into it

    def start(self, record: dict, plan: dict, layers: list[dict], workdir: Path) -> None:
        from mlflow.entities import Metric, Param

        client = self.client
        self.plan = plan
        self.requirements = record.get("requirements") or {}
        self.register_as = record.get("register")
        self.exp_id = _experiment_id(client, self.uri, f"deployfit/{record['model']}/{record['hardware']}")
        self.bundle = write_bundle(Path(workdir) / "tracking-bundle", record, plan, [], layers, plot=False)
        self.tags = {"prefect.flow_run_id": record.get("flow_run_id") or "", "deployfit.flow": record.get("flow", ""),
                     "mlflow.runName": run_name(record, plan), "mlflow.note.content": description(record, plan),
                     "deployfit.host": socket.gethostname(), "deployfit.pid": str(os.getpid())}
        if plan.get("recommended"):
            self.tags["deployfit.recommended"] = plan["recommended"]["compact"][:5000]
        link = prefect_link(record.get("flow_run_id"))
        if link:
            self.tags["prefect.flow_run_url"] = link
        close_stale_runs(client, self.exp_id)
        self.pid = client.create_run(self.exp_id, tags=self.tags).info.run_id
        params = {"model": record["model"], "hardware": record["hardware"], "data": record.get("data") or "none",
                  **_flat("req", record.get("requirements", {})), **_flat("search", record.get("search", {})),
                  **_flat("parallel", record.get("parallel", {}))}
        ident = plan.get("profile_identity") or {}
        prof = ident.get("profile") or {}
        # the profile's identity: a prediction that moved between two runs says whether its numbers did
        params.update({f"profile.{k}": str(prof[k]) for k in ("name", "hash", "cpu", "isa", "calibrated", "runtime")
                       if prof.get(k)})
        anchor = ident.get("anchor")
        params["latency.basis"] = "anchored" if anchor else "profile"
        if anchor:
            params.update({"anchor.original_ms": str(anchor["total_ms"]), "anchor.profile_ms": str(anchor["predicted_ms"]),
                           "anchor.measured_at": anchor["measured_at"], "anchor.truths": str(anchor["truths"])})
        client.log_batch(self.pid, params=[Param(k, v[:6000]) for k, v in params.items()])
        if prof.get("warning"):
            client.set_tag(self.pid, "deployfit.profile_warning", prof["warning"][:5000])
        summary = {"candidates_evaluated": plan.get("candidates_evaluated", 0),
                   "distinct_candidates": plan.get("distinct_candidates", 0), "search_seconds": plan.get("seconds", 0.0),
                   "candidates_per_second": plan.get("candidates_per_second", 0.0),
                   "pareto_points": len(plan.get("pareto", []))}
        if plan.get("recommended"):
            summary.update(_metrics("pred", plan["recommended"]["pred"]))
        client.log_batch(self.pid, metrics=[Metric(k, v, 0, 0) for k, v in summary.items()])
        cands = plan.get("candidates") or {}
        if cands:
            client.log_table(self.pid, cands, "candidates.json")
        if layers:
            client.log_table(self.pid, _columns(layers), "layers.json")
        for f in ("plan.json", "record.json"):
            client.log_artifact(self.pid, str(self.bundle / f))
        for p in _pareto_subset(plan.get("pareto", [])):
            self.nested.append(self._child("pareto", p, {}, []))  # the strategy is the run's `strategy` param

    def _child(self, kind: str, row: dict, extra_metrics: dict, files: list[Path]) -> str:
        from mlflow.entities import Metric, Param, RunTag

        client = self.client
        timing = row.get("timing") or {}
        start = int(timing["started"] * 1000) if timing.get("started") else None
        r = client.create_run(self.exp_id, start_time=start,
                              tags={"mlflow.parentRunId": self.pid, "mlflow.runName": child_name(kind, row),
                                    "deployfit.kind": kind, "prefect.flow_run_id": self.tags["prefect.flow_run_id"]})
        rid = r.info.run_id
        client.log_batch(rid, metrics=[Metric(k, v, 0, 0) for k, v in {**_metrics("pred", row["pred"]),
                                                                        **extra_metrics}.items()],
                         params=[Param("strategy", row["compact"][:6000])]
                         + ([Param("latency_basis", row["latency_basis"])] if row.get("latency_basis") else []),
                         tags=[RunTag("deployfit.label", row.get("label", row["compact"])[:5000])])
        for f in files:
            client.log_artifact(rid, str(f))
        client.set_terminated(rid, end_time=int(timing["ended"] * 1000) if timing.get("ended") else None)
        return rid

    def executed(self, i: int, e: dict, final: bool = True) -> None:
        """The nested run of executed candidate `i` (strategy.json, the model, pred/meas/err metrics); called
        again with the final result (its latency is timed after every candidate is built), it logs what is
        new or changed. result.json is logged with the final result."""
        sub = write_executed(self.bundle, i, e)
        metrics = {**_metrics("meas", e.get("meas")), **err_metrics(e)}
        if i in self.executed_runs:
            from mlflow.entities import Metric

            rid, old = self.executed_runs[i], self.logged[i]
            new = {k: v for k, v in metrics.items() if old.get(k) != v}
            if new:
                self.client.log_batch(rid, metrics=[Metric(k, v, 0, 0) for k, v in new.items()])
            files = [sub / "result.json"] if final else []
        else:
            files = [sub / "strategy.json"] + ([sub / "result.json"] if final else [])
            model_file = (e.get("artifact") or {}).get("model")
            if model_file and Path(model_file).is_file():
                files.append(Path(model_file))
            rid = self._child("executed", {**e, "label": e.get("label", e["compact"])}, metrics, [])
            self.nested.append(rid)
            self.executed_runs[i] = rid
            if model_file and Path(model_file).is_file():
                self._log_model(rid, e, Path(model_file))
            onnx_file = (e.get("artifact") or {}).get("onnx")
            if onnx_file and Path(onnx_file).is_file():
                self._log_onnx(rid, e, Path(onnx_file))
        for f in files:
            self.client.log_artifact(rid, str(f))
        self.logged[i] = metrics

    def _log_model(self, rid: str, e: dict, path: Path) -> None:
        """The artifact as an MLflow model of the run (pyfunc from code, flows/mlflow_pyfunc.py: the program
        itself, a signature and an input example), so that it can be registered. A model of several inputs is
        not: a pyfunc takes one input."""
        import mlflow
        import torch

        from estimators.modelspec import n_inputs, seeded_input

        shape = e.get("input_shape")
        if not shape or n_inputs(shape) != 1:
            self.client.set_tag(rid, "deployfit.model_note", "not logged as an MLflow model: it takes several inputs")
            return
        with self._reopened(rid, e):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(Path(__file__).with_name("mlflow_pyfunc.py")),
                artifacts={"program": str(path)}, input_example=seeded_input(shape, 2).numpy(),
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                                  "numpy"])
        self.models[rid] = info.model_uri

    @contextmanager
    def _reopened(self, rid: str, e: dict) -> Iterator[None]:
        """The executed candidate's run reopened for mlflow's fluent model logging, then closed again at the end of
        the candidate's execution (e["timing"]): the run keeps spanning the execution, not the logging."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=rid):
            yield
        timing = e.get("timing") or {}
        self.client.set_terminated(rid, end_time=int(timing["ended"] * 1000) if timing.get("ended") else None)

    def _log_onnx(self, rid: str, e: dict, path: Path) -> None:
        """The ONNX export as an MLflow model of the run, ONNX flavour (`onnx-model`, its signature inferred from an
        input example run in ONNX Runtime), beside the pyfunc of the program; its checks as tags."""
        import mlflow.onnx
        import onnx
        from mlflow.entities import RunTag

        from estimators.modelspec import n_inputs, seeded_input

        shape = e.get("input_shape")
        check = e.get("onnx") or {}
        self.client.log_batch(rid, tags=[RunTag(f"deployfit.onnx.{k}", str(check[k])) for k in (
            "form", "opset", "max_rel_diff", "top1_agreement", "trtexec") if k in check])
        example = seeded_input(shape, 2).numpy() if shape and n_inputs(shape) == 1 else None
        with self._reopened(rid, e):
            mlflow.onnx.log_model(onnx.load(str(path)), name="onnx-model", input_example=example,
                                  save_as_external_data=False,
                                  pip_requirements=[f"onnx=={onnx.__version__}", "onnxruntime", "numpy"])

    def register(self, name: str, executed: list[dict]) -> dict[str, Any] | None:
        """Register the recommended candidate's model (else the first executed one's) as a new version of `name`
        in the Model Registry."""
        import mlflow

        rec = (self.plan.get("recommended") or {}).get("compact")
        order = sorted(range(len(executed)), key=lambda i: executed[i]["compact"] != rec)
        for i in order:
            uri = self.models.get(self.executed_runs.get(i, ""))
            if uri:
                mlflow.set_tracking_uri(self.uri)
                mv = mlflow.register_model(uri, name)
                self.client.set_model_version_tag(name, mv.version, "deployfit.strategy", executed[i]["compact"])
                return {"name": name, "version": int(mv.version), "strategy": executed[i]["compact"],
                        "model_uri": uri, "recommended": executed[i]["compact"] == rec}
        return None

    def finish(self, executed: list[dict]) -> dict[str, Any]:
        """Each executed candidate's final result, the Pareto plot with the measured points, the parent closed."""
        for i, e in enumerate(executed):
            self.executed(i, e)
        self.client.log_artifact(self.pid, str(pareto_plot(self.plan, executed, self.bundle / "pareto.png")))
        line = executed_line(executed, self.executed_runs, self.requirements, self.exp_id)
        if line:
            self.client.set_tag(self.pid, "mlflow.note.content", self.tags["mlflow.note.content"] + "\n\n" + line)
        best = best_executed(executed, self.requirements)
        if best is not None and best in self.executed_runs:
            self.client.set_tag(self.pid, "deployfit.best_executed_run", self.executed_runs[best])
        registered = self.register(self.register_as, executed) if self.register_as else None
        if registered:
            self.client.set_tag(self.pid, "deployfit.registered", f"{registered['name']} v{registered['version']}")
        self.client.set_terminated(self.pid)
        return {"uri": self.uri, "experiment_id": self.exp_id, "run_id": self.pid, "nested_runs": len(self.nested),
                "executed_runs": [self.executed_runs[i] for i in range(len(executed))],
                "link": ui_link(self.uri, self.exp_id, self.pid), "registered": registered}

    def abandon(self) -> None:
        """A failed attempt's parent run is closed as FAILED (a retry logs the run anew)."""
        if self.pid:
            try:
                self.client.set_terminated(self.pid, "FAILED")
            except Exception:
                pass


def log_run(record: dict, plan: dict, executed: list[dict], layers: list[dict], workdir: Path) -> dict[str, Any]:
    """Log a flow run to MLflow in one go. Raises when the store cannot be reached (the caller keeps a local
    copy)."""
    lg = _Logger()
    try:
        lg.start(record, plan, layers, workdir)
        return lg.finish(executed)
    except Exception:
        lg.abandon()
        raise


# The background session: a process of its own (`python -m flows.tracking`, so nothing of the flow's torch
# state is copied and no main module is re-imported), where mlflow is imported and the store opened while
# the flow analyses, and the plan is logged while the candidates execute. A process, not a thread: MLflow's
# work is Python and would hold the GIL against the flow's own Python (training loops, the search).
# Requests and replies are pickled over the process's stdin and its original stdout.
_W: dict[str, Any] = {}


class TrackingError(RuntimeError):
    """The tracking store failed (or the tracking process ended); the message names the original error."""


def _w_call(method: str, *args) -> Any:
    if "error" in _W:
        raise _W["error"]
    try:
        return getattr(_W["logger"], method)(*args)
    except Exception as exc:
        _W["error"] = exc
        _W["logger"].abandon()
        raise


def _serve() -> None:
    import pickle
    import sys

    try:  # the flow's own work (and its timings) come first
        os.nice(19)
    except OSError:
        pass
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to stderr, never into the replies
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401

        _W["logger"] = _Logger()
    except Exception as exc:  # said at the first request
        _W["error"] = exc
    inp = sys.stdin.buffer
    while True:
        try:
            method, args = pickle.load(inp)
        except EOFError:
            return
        try:
            reply = (True, _w_call(method, *args))
        except Exception as exc:
            reply = (False, f"{type(exc).__name__}: {exc}")
        pickle.dump(reply, out)
        out.flush()


class Session:
    """MLflow logging of one flow run in a background process. `start` is called once the plan is known,
    `finish` at the end (its result is `log_run`'s, or it raises the first error); `idle` waits until the
    process has nothing left to do (before latency is timed, so that it does not disturb the timing)."""

    def __init__(self):
        import queue
        import subprocess
        import sys
        import threading

        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen([sys.executable, "-m", "flows.tracking"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env=env)
        self._queue: queue.Queue = queue.Queue()
        self._pending: list = []
        self.used = False
        threading.Thread(target=self._pump, name="deployfit-tracking", daemon=True).start()

    def _pump(self) -> None:
        import pickle

        while (item := self._queue.get()) is not None:
            fut, method, args = item
            try:
                pickle.dump((method, args), self._proc.stdin)
                self._proc.stdin.flush()
                ok, value = pickle.load(self._proc.stdout)
            except Exception as exc:  # the process is gone
                fut.set_exception(TrackingError(f"the tracking process ended ({type(exc).__name__}: {exc})"))
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(TrackingError(value))

    def _submit(self, method: str, *args):
        from concurrent.futures import Future

        fut: Future = Future()
        self._pending.append(fut)
        self._queue.put((fut, method, args))
        return fut

    def start(self, record: dict, plan: dict, layers: list[dict], workdir: Path) -> None:
        self._submit("start", record, plan, layers, Path(workdir))

    def executed(self, i: int, e: dict) -> None:
        """Executed candidate `i` as known now (`finish` completes it)."""
        self._submit("executed", i, e, False)

    def idle(self) -> None:
        from concurrent.futures import wait

        wait(self._pending)

    def finish(self, executed: list[dict]) -> dict[str, Any]:
        """The tracked run (as `log_run` returns it); raises the session's first error."""
        self.used = True
        last = self._submit("finish", executed)
        try:
            for f in self._pending:
                f.result()
            return last.result()
        finally:
            self.close()

    def close(self) -> None:
        """The process ends when its input closes (also when this process dies)."""
        self._queue.put(None)
        if self._proc.stdin and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except OSError:
                pass


def save_local(folder: Path, record: dict, plan: dict, executed: list[dict], layers: list[dict], error: str) -> dict:
    """The fallback when the tracking store is down: the run's whole content as files under `folder`."""
    write_bundle(folder, {**record, "tracking_error": error}, plan, executed, layers)
    for i, e in enumerate(executed):
        model_file = (e.get("artifact") or {}).get("model")
        if model_file and Path(model_file).is_file():
            shutil.copy2(model_file, folder / f"executed-{i}" / Path(model_file).name)
    return {"uri": tracking_uri(), "saved_locally": str(folder), "error": error}


SYNC_TAG = "deployfit.fallback_id"  # a parent run pushed by sync_local: the content hash of its fallback folder


def sync_local(folder: str | Path, uri: str | None = None) -> dict[str, Any]:
    """Push a run that save_local kept (a `tracking-fallback` folder) into the tracking store: the parent run,
    its Pareto and executed nested runs and files, as the flow would have logged them. Idempotent: the parent is
    tagged with the folder's content hash, and a folder the store already holds is not logged again
    (`already: True`)."""
    import hashlib
    import tempfile

    from estimators.errors import UserInputError

    folder = Path(folder)
    names = ("record.json", "plan.json", "candidates.json", "layers.json")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UserInputError(f"{folder} is not a run kept by the tracking fallback (it has no {', '.join(missing)})")
    try:
        raw = {n: (folder / n).read_bytes() for n in names}
        record, plan, candidates, layers = (json.loads(raw[n]) for n in names)
        subs = sorted(folder.glob("executed-*"), key=lambda d: int(d.name.split("-")[1]))
        executed = [json.loads((d / "result.json").read_bytes()) for d in subs]
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{folder}: cannot read the kept run: {exc}") from None
    fid = hashlib.sha256(b"".join(raw[n] for n in names)).hexdigest()[:16]
    for e, d in zip(executed, subs):  # the model file as the fallback copied it
        model_file = (e.get("artifact") or {}).get("model")
        if model_file and (d / Path(model_file).name).is_file():
            e["artifact"] = {**e["artifact"], "model": str(d / Path(model_file).name)}
    lg = _Logger(uri)
    exp_id = _experiment_id(lg.client, lg.uri, f"deployfit/{record['model']}/{record['hardware']}")
    found = lg.client.search_runs([exp_id], filter_string=f"tags.`{SYNC_TAG}` = '{fid}'")
    if found:
        return {"uri": lg.uri, "experiment_id": exp_id, "run_id": found[0].info.run_id, "already": True,
                "link": ui_link(lg.uri, exp_id, found[0].info.run_id)}
    record = {k: v for k, v in record.items() if k != "tracking_error"}
    with tempfile.TemporaryDirectory() as work:
        try:
            lg.start(record, {**plan, "candidates": candidates}, layers, Path(work))
            lg.client.set_tag(lg.pid, SYNC_TAG, fid)
            out = lg.finish(executed)
        except Exception:
            lg.abandon()
            raise
    return {**out, "already": False}


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


if __name__ == "__main__":
    _serve()
