"""Logging one flow run into MLflow: the parent run (plan, bundle, description with its links) and a nested run
per candidate (predicted, measured, error metrics; the artifact, its ONNX form), in the tracking process."""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .mlflow_store import client_for, close_stale_runs, experiment_id, tracking_uri, ui_link
from .run_content import (best_executed, candidate_columns, child_name, description, err_metrics, executed_line, flat_params,
                          pareto_plot, pareto_subset, prefect_link, prefixed_metrics, run_name, write_bundle,
                          write_executed)



class RunLogger:
    """Logs one flow run in three phases: `start` (parent run, params, the plan's summary, the candidate table,
    plan/layers/record files and the Pareto nested runs), `executed` (one nested run per executed candidate)
    and `finish` (the Pareto plot with the measured points, the parent closed). Raises when the store cannot
    be reached."""

    def __init__(self, uri: str | None = None):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a down server fails in seconds, not minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri = uri or tracking_uri()
        self.client = client_for(self.uri)
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
        self.exp_id = experiment_id(client, self.uri, f"deployfit/{record['model']}/{record['hardware']}")
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
                  "runtime": record.get("runtime") or "pytorch",
                  **flat_params("req", record.get("requirements", {})), **flat_params("search", record.get("search", {})),
                  **flat_params("parallel", record.get("parallel", {}))}
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
            if anchor.get("probe"):  # the anchor's second point (hardware.anchor.PROBE_STRATEGY)
                params["anchor.probe_ms"] = str(anchor["probe"]["total_ms"])
        client.log_batch(self.pid, params=[Param(k, v[:6000]) for k, v in params.items()])
        if prof.get("warning"):
            client.set_tag(self.pid, "deployfit.profile_warning", prof["warning"][:5000])
        summary = {"candidates_evaluated": plan.get("candidates_evaluated", 0),
                   "distinct_candidates": plan.get("distinct_candidates", 0), "search_seconds": plan.get("seconds", 0.0),
                   "candidates_per_second": plan.get("candidates_per_second", 0.0),
                   "pareto_points": len(plan.get("pareto", []))}
        if plan.get("recommended"):
            summary.update(prefixed_metrics("pred", plan["recommended"]["pred"]))
        client.log_batch(self.pid, metrics=[Metric(k, v, 0, 0) for k, v in summary.items()])
        cands = plan.get("candidates") or {}
        if cands:
            client.log_table(self.pid, cands, "candidates.json")
        if layers:
            client.log_table(self.pid, candidate_columns(layers), "layers.json")
        for f in ("plan.json", "record.json"):
            client.log_artifact(self.pid, str(self.bundle / f))
        for p in pareto_subset(plan.get("pareto", [])):
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
        client.log_batch(rid, metrics=[Metric(k, v, 0, 0) for k, v in {**prefixed_metrics("pred", row["pred"]),
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
        metrics = {**prefixed_metrics("meas", e.get("meas")), **err_metrics(e)}
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
    lg = RunLogger()
    try:
        lg.start(record, plan, layers, workdir)
        return lg.finish(executed)
    except Exception:
        lg.abandon()
        raise
