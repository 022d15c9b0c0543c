"""MLflow tracking: this module and the two it builds on (flows.mlflow_store: where the store is and its client;
flows.mlflow_logger: what one run logs) are the only ones that import mlflow.

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
import shutil
from pathlib import Path
from typing import Any

from .mlflow_logger import RunLogger, log_run  # noqa: F401  (log_run: re-exported)
from .mlflow_store import (DEFAULT_ARTIFACTS, DEFAULT_DB, REPO, client_for, close_stale_runs, experiment_id,  # noqa: F401
                           tracking_uri, ui_link)  # (DEFAULT_*, close_stale_runs: re-exported for the CLI and tests)
from .run_content import ML_VIEW, best_executed, executed_line, write_bundle  # noqa: F401  (ML_VIEW, best_*: the same)


class TrackingError(RuntimeError):
    """The tracking store failed (or the tracking process ended); the message names the original error."""


# The background session: a process of its own (`python -m flows.tracking`, so nothing of the flow's torch
# state is copied and no main module is re-imported), where mlflow is imported and the store opened while
# the flow analyses, and the plan is logged while the candidates execute. A process, not a thread: MLflow's
# work is Python and would hold the GIL against the flow's own Python (training loops, the search).
# Requests and replies are pickled over the process's stdin and its original stdout.
_W: dict[str, Any] = {}


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

        _W["logger"] = RunLogger()
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
    lg = RunLogger(uri)
    exp_id = experiment_id(lg.client, lg.uri, f"deployfit/{record['model']}/{record['hardware']}")
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
    client = client_for(uri)
    return {n: client.download_artifacts(run_id, n, dest) for n in names}


def download_model(uri: str, run_id: str, name: str, dest: Path) -> Path:
    """An MLflow model a run logged (e.g. `onnx-model`), downloaded into `dest`; returns its folder."""
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/{name}", dst_path=str(dest),
                                                    tracking_uri=uri))


def log_measurement(uri: str, run_id: str, metrics: dict[str, float], tags: dict[str, str]) -> None:
    from mlflow.entities import Metric, RunTag

    client_for(uri).log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
                           tags=[RunTag(k, v) for k, v in tags.items()])


def read_run(uri: str, run_id: str, metrics: tuple[str, ...], tags: tuple[str, ...] = ()
             ) -> tuple[dict[str, float], dict[str, str]]:
    """The named metrics and tags a run has (one read of the run)."""
    data = client_for(uri).get_run(run_id).data
    return ({k: data.metrics[k] for k in metrics if k in data.metrics},
            {k: data.tags[k] for k in tags if k in data.tags})


def log_profile(uri: str, hardware: str, path: Path, params: dict[str, str]) -> str:
    """A device-calibrated profile, as artifact profile.yaml of a run in experiment deployfit/calibration/<hw>."""
    from mlflow.entities import Param

    client = client_for(uri)
    exp_id = experiment_id(client, uri, f"deployfit/calibration/{hardware}")
    run = client.create_run(exp_id, tags={"mlflow.runName": f"calibrate {hardware}", "deployfit.kind": "calibration"})
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def fetch_profile(uri: str, hardware: str, dest: Path) -> Path | None:
    """The newest device-calibrated profile of `hardware` from the tracking store, copied to `dest`."""
    client = client_for(uri)
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
