"""The MLflow store: where it is (tracking_uri, artifact_location), how a run is linked (ui_link), its client,
its experiments (created as model-training experiments), and runs a crashed flow left open."""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from .run_content import ML_VIEW

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DB = REPO / "mlflow" / "mlflow.db"
DEFAULT_ARTIFACTS = REPO / "mlflow" / "artifacts"
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"  # the UI opens it on runs, not GenAI traces


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


def client_for(uri: str):
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


def experiment_id(client, uri: str, name: str) -> str:
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
            crash_flow_run(run.data.tags.get("prefect.flow_run_id", ""), pid)
        except PermissionError:  # alive, another user's
            pass
    return stale


def crash_flow_run(flow_run_id: str, pid: str) -> None:
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
