"""Nothing lost when runs share a new tracking store: concurrent first clients of a SQLite MLflow store used to
collide in its schema migration (`table ... already exists`), and neither run was recorded."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ONE_RUN = """
import sys
from flows.mlflow_store import client_for, experiment_id
uri = sys.argv[1]
client = client_for(uri)
run = client.create_run(experiment_id(client, uri, "concurrent"))
client.set_terminated(run.info.run_id)
"""


@pytest.mark.slow
def test_four_runs_at_once_on_a_new_sqlite_store_are_all_recorded(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
    procs = [subprocess.Popen([sys.executable, "-c", ONE_RUN, uri], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in outs]
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("concurrent")
    assert len(client.search_runs([exp.experiment_id])) == 4


@pytest.mark.slow  # a process killed mid-run and a tracking store
def test_a_parent_run_left_running_by_a_dead_process_is_marked_killed(tmp_path):
    """A run killed outright (SIGKILL) cannot close its MLflow parent run: the next run on the machine marks it
    KILLED, and leaves alone one whose process is alive."""
    import socket

    from flows.mlflow_store import client_for, close_stale_runs, experiment_id

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = client_for(uri)
    exp = experiment_id(client, uri, "stale")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    gone = client.create_run(exp, tags={"deployfit.host": host, "deployfit.pid": str(dead.pid)}).info.run_id
    alive = client.create_run(exp, tags={"deployfit.host": host, "deployfit.pid": str(os.getppid())}).info.run_id
    elsewhere = client.create_run(exp, tags={"deployfit.host": host + "-other", "deployfit.pid": str(dead.pid)}).info.run_id
    assert close_stale_runs(client, exp) == [gone]
    assert [client.get_run(r).info.status for r in (gone, alive, elsewhere)] == ["KILLED", "RUNNING", "RUNNING"]
