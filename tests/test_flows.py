"""The Prefect flows against the real Prefect test harness and a real SQLite MLflow store (no mocks): a `run`
flow completes and leaves its parent run, nested runs with pred/meas/err metrics and artifacts in MLflow and
its flow run and markdown artifact in Prefect; an unreachable tracking store leaves the results on disk; a
served deployment can be triggered with run_deployment and completes."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from hosts import fresh_process_key, seed_host
from search.requirements import Requirements
from tasks.pipeline import ModelInput, SearchOptions

FAST = SearchOptions(nsga_evals=300, grid_step=0.05, finetune_epochs=1)
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _prefect(coro_fn):
    import asyncio

    from prefect.client.orchestration import get_client

    async def go():
        async with get_client() as client:
            return await coro_fn(client)

    return asyncio.run(go())


@dataclasses.dataclass
class DigitsRun:
    """One `run` flow of the digits demo (top-2 executed, the recommendation registered), shared by the tests that
    read what it left in MLflow and Prefect: its report, its MLflow store and its folder."""

    rep: dict
    uri: str
    folder: Path

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def parent(self):
        return self.client().get_run(self.rep["tracking"]["run_id"])

    def nested(self) -> list:
        client, tr = self.client(), self.rep["tracking"]
        return client.search_runs([tr["experiment_id"]], f"tags.mlflow.parentRunId = '{tr['run_id']}'",
                                  max_results=500)


@pytest.fixture(scope="module")
def digits_run(harness, tmp_path_factory) -> DigitsRun:
    from flows.pipeline import run_flow

    folder = tmp_path_factory.mktemp("digits-run")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("DEPLOYFIT_CACHE_DIR", str(folder / "cache-1"))  # the recovery model's truths, the anchor
        seed_host()
        rep = run_flow(model=ModelInput(spec="demo:digits-cnn"), data="digits", hardware="host",
                       requirements=Requirements(max_size_mb=0.05), search=FAST, top_k=2, out_dir=str(folder / "runs"),
                       register_as="digits-cnn-compressed")
    return DigitsRun(rep, uri, folder)


def test_run_flow_executes_and_measures_the_top_k(digits_run):
    rep = digits_run.rep
    assert rep["recommended"] and len(rep["executed"]) == 2
    for e in rep["executed"]:
        assert {"params", "size_bytes", "latency_ms", "accuracy", "accuracy_drop"} <= set(e["meas"])
        assert e["err"]["params"] == 0.0  # the pruning estimate is exact
        # measured in alternation with the original, on the anchor's scale; predicted anchored on it
        assert e["meas"]["speedup"] > 0 and "latency_ms" in e["err"]


def test_the_parent_run_records_inputs_profile_anchor_and_search(digits_run):
    rep, tr = digits_run.rep, digits_run.rep["tracking"]
    exp = digits_run.client().get_experiment_by_name("deployfit/demo:digits-cnn/host")
    assert exp is not None and exp.experiment_id == tr["experiment_id"]
    parent = digits_run.parent()
    assert parent.data.params["model"] == "demo:digits-cnn" and parent.data.params["data"] == "digits"
    assert parent.data.params["req.max_size_mb"] == "0.05" and parent.data.params["runtime"] == "pytorch"
    # the profile's identity and the latency's basis, so that a prediction that moved between runs says why
    assert parent.data.params["profile.name"] == "host" and len(parent.data.params["profile.hash"]) == 12
    assert parent.data.params["profile.calibrated"] and parent.data.params["latency.basis"] == "anchored"
    assert float(parent.data.params["anchor.original_ms"]) > 0
    assert parent.data.tags["prefect.flow_run_id"] == rep["flow_run_id"]
    assert parent.data.metrics["candidates_evaluated"] == rep["candidates_evaluated"]
    assert parent.data.metrics["distinct_candidates"] == rep["distinct_candidates"]
    assert parent.data.params["parallel.workers"] == "1"


def test_the_parent_run_is_named_and_described_with_the_best_executed(digits_run):
    from flows.tracking import best_executed

    rep, tr = digits_run.rep, digits_run.rep["tracking"]
    exp = digits_run.client().get_experiment_by_name("deployfit/demo:digits-cnn/host")
    parent = digits_run.parent()
    # the experiment is one of model training; the run is named after model, hardware, time and recommendation,
    # as its Prefect flow run is, and its description says what is recommended and why
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    name = parent.data.tags["mlflow.runName"]
    assert name.startswith("demo:digits-cnn on host 20") and name.endswith(": " + rep["recommended"]["label"])
    assert rep["recommended"]["label"] in parent.data.tags["mlflow.note.content"]
    assert "binding requirements" in parent.data.tags["mlflow.note.content"]
    # and links the best executed candidate's run (three clicks from the start page: experiment, run, this link)
    best = best_executed(rep["executed"], {"max_size_mb": 0.05})
    if best is None:
        assert "none of the 2 executed candidates" in parent.data.tags["mlflow.note.content"]
    else:
        rid = tr["executed_runs"][best]
        assert parent.data.tags["deployfit.best_executed_run"] == rid
        assert f"/runs/{rid}?" in parent.data.tags["mlflow.note.content"]


def test_the_parent_run_holds_the_whole_space_and_the_layers(digits_run, tmp_path):
    rep, tr, client = digits_run.rep, digits_run.rep["tracking"], digits_run.client()
    names = {a.path for a in client.list_artifacts(tr["run_id"])}
    assert {"candidates.json", "plan.json", "layers.json", "pareto.png", "record.json"} <= names
    table = json.loads(Path(client.download_artifacts(tr["run_id"], "candidates.json", str(tmp_path))).read_text())
    assert len(table["data"]) == rep["distinct_candidates"]  # the whole space
    layers = json.loads(Path(client.download_artifacts(tr["run_id"], "layers.json", str(tmp_path))).read_text())
    assert set(layers) == {"columns", "data"} and layers["data"]  # a table the UI renders, sorted as numbers


def test_each_executed_candidate_is_a_nested_run_with_its_program_and_onnx(digits_run):
    import mlflow
    import mlflow.onnx

    rep, tr, client = digits_run.rep, digits_run.rep["tracking"], digits_run.client()
    kids = digits_run.nested()
    mlflow.set_tracking_uri(digits_run.uri)
    executed = [r for r in kids if r.data.tags["deployfit.kind"] == "executed"]
    pareto = [r for r in kids if r.data.tags["deployfit.kind"] == "pareto"]
    assert len(executed) == 2 and len(pareto) == min(len(rep["pareto"]), 25) and len(kids) == tr["nested_runs"]
    assert len({r.data.tags["mlflow.runName"] for r in kids}) == len(kids)  # nested runs tell apart
    assert all("pred.latency_ms" in r.data.metrics for r in pareto)
    for r in executed:
        keys = set(r.data.metrics)
        assert {"pred.size_bytes", "meas.size_bytes", "err.size_bytes", "pred.latency_ms", "meas.latency_ms",
                "err.latency_ms", "meas.accuracy", "err.accuracy_drop_points"} <= keys
        assert "err.accuracy_drop" not in keys  # err.* is relative, and a drop near zero has none
        # real durations: the run spans the candidate's execution, not the moment it was logged
        assert r.info.end_time - r.info.start_time >= 500
        files = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"strategy.json", "result.json", "model.pt2"} <= files
        # the ONNX export, checked in ONNX Runtime, is an MLflow model of the ONNX flavour beside the program
        assert "err.onnx_size_bytes" in keys and abs(r.data.metrics["err.onnx_size_bytes"]) < 0.01
        assert r.data.tags["deployfit.onnx.form"] in ("fp32", "fp16", "int8")
        onnx_model = mlflow.onnx.load_model(f"runs:/{r.info.run_id}/onnx-model")
        assert onnx_model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for e in rep["executed"]:
        assert Path(e["onnx"]["path"]).is_file() and e["onnx"]["checker"].startswith("passed")
        assert e["onnx"]["trtexec"].startswith("trtexec --onnx=model.onnx")


def test_the_recommended_candidate_is_registered_as_a_loadable_model(digits_run):
    # each executed artifact is an MLflow model (signature, input example); the recommended one is registered
    import mlflow
    import numpy as np

    rep, client = digits_run.rep, digits_run.client()
    reg = rep["tracking"]["registered"]
    assert reg["name"] == "digits-cnn-compressed" and reg["version"] == 1 and reg["recommended"]
    assert reg["strategy"] == rep["recommended"]["compact"]
    mv = client.get_model_version("digits-cnn-compressed", "1")
    assert mv.tags["deployfit.strategy"] == reg["strategy"]
    mlflow.set_tracking_uri(digits_run.uri)
    loaded = mlflow.pyfunc.load_model(reg["model_uri"])
    assert loaded.metadata.signature is not None
    out = loaded.predict(np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32))
    assert out.shape == (3, 10) and np.isfinite(out).all()


def test_the_prefect_flow_run_shares_the_name_and_leaves_its_markdown(digits_run):
    rep, tr = digits_run.rep, digits_run.rep["tracking"]

    async def prefect_side(client):
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        run = await client.read_flow_run(rep["flow_run_id"])
        arts = await client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        return run, arts

    run, arts = _prefect(prefect_side)
    assert run.state.is_completed()
    assert digits_run.parent().data.tags["mlflow.runName"].startswith(run.name + ": ")  # one name in both UIs
    md = [a for a in arts if a.type == "markdown"]
    assert md and "Executed: predicted vs measured" in md[0].data and tr["run_id"] in md[0].data
    probe = rep["profile_identity"]["anchor"]["probe"]  # the anchor's second point, named in the report
    assert probe["strategy"] == "prune:0.5" and f"pruned by half {probe['total_ms']} ms" in md[0].data


def test_a_rerun_finds_the_finished_steps_persisted(digits_run, monkeypatch):
    """A rerun (as after a crash) finds the analysis, the sensitivity and the executed candidates persisted (the
    recovery store starts empty again, and the anchor is the first run's without its truths, so the plan and its
    top-2 are the same: a new anchor is a new measurement, its truths refit the latency predictions)."""
    from flows.pipeline import run_flow

    folder, rep = digits_run.folder, digits_run.rep
    monkeypatch.setenv("MLFLOW_TRACKING_URI", digits_run.uri)
    monkeypatch.setenv("DEPLOYFIT_CACHE_DIR", str(folder / "cache-2"))
    seed_host()
    (folder / "cache-2" / "anchors").mkdir()
    for f in (folder / "cache-1" / "anchors").glob("*.json"):
        (folder / "cache-2" / "anchors" / f.name).write_text(json.dumps({**json.loads(f.read_text()), "truths": []}))
    again = run_flow(model=ModelInput(spec="demo:digits-cnn"), data="digits", hardware="host",
                     requirements=Requirements(max_size_mb=0.05), search=FAST, top_k=2, out_dir=str(folder / "runs"))

    async def task_states(client):
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        trs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[again["flow_run_id"]])))
        return {t.name: t.state.name for t in trs}

    states = _prefect(task_states)
    cached = {n: st for n, st in states.items() if n.startswith(("analyze", "accuracy-sensitivity", "execute"))}
    assert len(cached) == 4 and set(cached.values()) == {"Cached"}, states

    def built(e):  # what the cached execution produced (latency is measured again, one candidate at a time)
        return {k: v for k, v in e["meas"].items() if k not in ("latency_ms", "speedup")}

    assert [built(e) for e in again["executed"]] == [built(e) for e in rep["executed"]]


def test_run_flow_in_onnx_runtime_predicts_and_measures_each_candidates_onnx(harness, mlflow_store, tmp_path,
                                                                            monkeypatch):
    """`runtime: onnxruntime`: the plan is anchored on the original measured in ONNX Runtime, every executed
    candidate gets its model.onnx (even with export pt2 alone), timed in a session against the original's, and the
    run records the runtime in MLflow and in its report."""
    from mlflow.tracking import MlflowClient

    from flows.pipeline import run_flow

    monkeypatch.setenv("DEPLOYFIT_CACHE_DIR", str(tmp_path / "cache"))
    seed_host()
    rep = run_flow(model=ModelInput(spec="demo:digits-cnn"), data=None, hardware="host", runtime="onnxruntime",
                   requirements=Requirements(max_size_mb=0.05), search=FAST, top_k=1, export=["pt2"],
                   out_dir=str(tmp_path / "runs"))
    assert rep["runtime"] == "onnxruntime" and rep["profile_identity"]["runtime"] == "onnxruntime"
    assert "ONNX Runtime" in rep["profile_identity"]["anchor"]["where"]
    (e,) = rep["executed"]
    assert Path(e["onnx"]["path"]).is_file()
    assert e["meas"]["latency_ms"] > 0 and "latency_ms" in e["err"], e
    client = MlflowClient(tracking_uri=mlflow_store)
    parent = client.get_run(rep["tracking"]["run_id"])
    assert parent.data.params["runtime"] == "onnxruntime" and parent.data.params["latency.basis"] == "anchored"
    kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    (run,) = [r for r in kids if r.data.tags["deployfit.kind"] == "executed"]
    done = json.loads(Path(client.download_artifacts(run.info.run_id, "result.json", str(tmp_path))).read_text())
    assert done["latency_measurement"]["runtime"].startswith("onnxruntime")


def test_best_executed_meets_every_requirement_as_measured_with_the_least_drop():
    from flows.tracking import best_executed, executed_line

    runs = {0: "r0", 1: "r1", 2: "r2"}
    ex = [{"compact": "a", "label": "A", "meas": {"size_bytes": 60_000, "accuracy_drop": 0.1}},  # too large
          {"compact": "b", "label": "B", "meas": {"size_bytes": 40_000, "accuracy_drop": 0.9, "latency_ms": 0.2}},
          {"compact": "c", "label": "C", "meas": {"size_bytes": 45_000, "accuracy_drop": 0.4, "latency_ms": 0.3}}]
    assert best_executed(ex, {"max_size_mb": 0.05}) == 2
    line = executed_line(ex, runs, {"max_size_mb": 0.05}, "7")
    assert line.startswith("**Best executed:** [C](#/experiments/7/runs/r2?") and "+0.40 points" in line
    assert best_executed(ex, {"max_size_mb": 0.01}) is None
    assert "none of the 3 executed candidates" in executed_line(ex, runs, {"max_size_mb": 0.01}, "7")
    assert executed_line([], runs, {}, "7") == ""


def test_flow_parameters_are_validated_models(harness):
    from prefect.exceptions import ParameterTypeError

    from flows.pipeline import plan_flow, run_flow

    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(run_flow.fn).model_dump()  # what the Prefect UI renders as the run form
    props = schema["properties"]
    assert {"model", "data", "hardware", "requirements", "search", "execute", "top_k"} <= set(props)
    assert props["top_k"]["default"] == 3 and props["top_k"]["minimum"] == 1
    assert {"max_latency_ms", "max_size_mb", "max_accuracy_drop"} <= set(schema["definitions"]["Requirements"]["properties"])
    with pytest.raises(ParameterTypeError):
        plan_flow(top_k=0)
    # the form checks an input shape against --input-shape's syntax (one shape, or several separated by ';')
    from estimators.modelspec import INPUT_SHAPE_PATTERN

    shape = schema["definitions"]["ModelInput"]["properties"]["input_shape"]
    assert shape["anyOf"][0]["pattern"] == INPUT_SHAPE_PATTERN
    for bad in ("1,3;", "1,3;;1,4", "a,b"):
        with pytest.raises(ParameterTypeError):
            plan_flow(model={"spec": "tinynets:two_input_net", "input_shape": bad})


def test_a_flow_run_left_running_by_a_killed_process_is_marked_crashed(harness, mlflow_store):
    """A run killed outright leaves its Prefect flow run RUNNING: the next run on the machine, closing the dead
    process's MLflow parent run as KILLED, sets the flow run Crashed too."""
    import socket

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from flows.mlflow_store import client_for, close_stale_runs, experiment_id

    @flow(name="killed-midway")
    def killed_midway():
        return None

    with get_client(sync_client=True) as pc:
        fr = pc.create_flow_run(killed_midway, state=Running())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    client = client_for(mlflow_store)
    exp = experiment_id(client, mlflow_store, "stale-flow-run")
    run = client.create_run(exp, tags={"deployfit.host": socket.gethostname(), "deployfit.pid": str(dead.pid),
                                       "prefect.flow_run_id": str(fr.id)}).info.run_id
    assert close_stale_runs(client, exp) == [run]
    with get_client(sync_client=True) as pc:
        state = pc.read_flow_run(fr.id).state
    assert state.type.value == "CRASHED" and str(dead.pid) in state.message


def test_lost_tracking_process_is_retried_by_the_track_task(harness, mlflow_store, tmp_path, monkeypatch):
    """The MLflow logging runs in a background process; if that process dies mid-run, the track task's retry
    logs the whole run from the flow's process and nothing is lost."""
    from mlflow.tracking import MlflowClient

    from flows import tracking
    from flows.pipeline import plan_flow

    started = tracking.Session.start

    def start_then_die(self, *args):
        started(self, *args)
        self._proc.kill()

    monkeypatch.setattr(tracking.Session, "start", start_then_die)
    rep = plan_flow(model=ModelInput(spec="demo:digits-cnn"), data=None, hardware="host",
                    requirements=Requirements(max_size_mb=0.05), search=FAST, out_dir=str(tmp_path / "runs"))
    tr = rep["tracking"]
    assert tr.get("run_id"), tr
    client = MlflowClient(mlflow_store)
    run = client.get_run(tr["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["model"] == "demo:digits-cnn"
    assert {"candidates.json", "pareto.png", "plan.json"} <= {a.path for a in client.list_artifacts(tr["run_id"])}
    nested = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{tr['run_id']}'")
    assert len(nested) == tr["nested_runs"] > 0


def test_unreachable_tracking_store_keeps_results_on_disk(harness, tmp_path, monkeypatch):
    from flows.pipeline import plan_flow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    t0 = time.time()
    rep = plan_flow(model=ModelInput(spec="demo:digits-cnn"), data=None, hardware="host",
                    requirements=Requirements(max_size_mb=0.05), search=FAST, out_dir=str(tmp_path / "runs"))
    assert time.time() - t0 < 120
    tr = rep["tracking"]
    assert "run_id" not in tr and tr["uri"] == "http://127.0.0.1:9" and tr["error"]
    folder = Path(tr["saved_locally"])
    for f in ("plan.json", "candidates.json", "layers.json", "pareto.png", "record.json"):
        assert (folder / f).is_file(), f
    assert json.loads((folder / "record.json").read_text())["tracking_error"] == tr["error"]
    assert json.loads((folder / "plan.json").read_text())["recommended"]["compact"] == rep["recommended"]["compact"]
    # `deployfit sync` pushes the kept run into a store once it is reachable, and only once
    from mlflow.tracking import MlflowClient

    from flows.tracking import sync_local

    uri = f"sqlite:///{tmp_path / 'later' / 'mlflow.db'}"
    first, again = sync_local(folder, uri), sync_local(folder, uri)
    assert not first["already"] and again["already"] and again["run_id"] == first["run_id"]
    client = MlflowClient(tracking_uri=uri)
    parents = client.search_runs([first["experiment_id"]], "attributes.status = 'FINISHED'")
    assert [r.info.run_id for r in parents if "mlflow.parentRunId" not in r.data.tags] == [first["run_id"]]
    assert {"candidates.json", "pareto.png", "plan.json"} <= {a.path for a in client.list_artifacts(first["run_id"])}


def test_served_deployment_runs_when_triggered(harness, mlflow_store, tmp_path):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    spec = tmp_path / "deployments.yaml"
    spec.write_text(json.dumps({"deployments": [{
        "name": "test-plan", "entrypoint": "flows/pipeline.py:plan_flow",
        "parameters": {"model": {"spec": "demo:digits-cnn"}, "data": None, "hardware": "host",
                       "requirements": {"max_size_mb": 0.05}, "search": FAST.model_dump(),
                       "out_dir": str(tmp_path / "served")}}]}))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--file", str(spec)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        async def wait_deployment(client):
            import asyncio

            for _ in range(240):
                try:
                    return await client.read_deployment_by_name("deployfit-plan/test-plan")
                except Exception:
                    if proc.poll() is not None:
                        raise RuntimeError(proc.stdout.read())
                    await asyncio.sleep(0.5)
            raise TimeoutError("the deployment was never served")

        _prefect(wait_deployment)
        run = run_deployment("deployfit-plan/test-plan", timeout=300, poll_interval=2)
        assert run.state.is_completed(), run.state
        reports = list((tmp_path / "served").glob("*/report.json"))
        assert reports and json.loads(reports[0].read_text())["flow_run_id"] == str(run.id)
    finally:
        _stop(proc)


def test_ui_starts_prefect_and_mlflow_servers_on_loopback(tmp_path, monkeypatch):
    import socket
    import urllib.request

    from flows.deployments import start_uis

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'ui.db'}")
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    said = []
    procs = start_uis(*ports, say=said.append, block=False)
    try:
        assert urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/api/health", timeout=10).status == 200
        assert urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/health", timeout=10).status == 200
        text = "\n".join(said)
        assert f"http://127.0.0.1:{ports[0]}" in text and f"http://127.0.0.1:{ports[1]}" in text
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


def _store_content(uri: str) -> dict:
    """What a run flow left in an MLflow store, less what differs between two runs of the same work: run ids,
    timings, where it ran (parallel.*), and the measured latency (timing noise)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("deployfit/demo:digits-cnn/host")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    skip = {"search_seconds", "candidates_per_second", "meas.latency_ms", "err.latency_ms", "meas.speedup"}
    out = []
    for r in runs:
        out.append((r.data.tags.get("deployfit.kind", "parent"), r.data.params.get("strategy", ""),
                    tuple(sorted((k, v) for k, v in r.data.params.items() if not k.startswith("parallel."))),
                    tuple(sorted((k, round(v, 6)) for k, v in r.data.metrics.items() if k not in skip)),
                    tuple(sorted(a.path for a in client.list_artifacts(r.info.run_id)))))
    return {"runs": sorted(out)}


def test_parallel_execution_on_a_dask_cluster_tracks_the_same_as_serial(harness, tmp_path, monkeypatch):
    from distributed import LocalCluster

    from flows.pipeline import run_flow
    from tasks.pipeline import ParallelOptions

    content = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        assert len(cluster.workers) == 2
        for mode, par in (("serial", ParallelOptions(threads=1)),
                          ("dask", ParallelOptions(dask_address=cluster.scheduler_address, threads=1))):
            uri = f"sqlite:///{tmp_path / mode}.db"
            monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
            monkeypatch.setenv("DEPLOYFIT_CACHE_DIR", str(tmp_path / f"cache-{mode}"))
            seed_host()
            rep = run_flow(model=ModelInput(spec="demo:digits-cnn"), data="digits", hardware="host",
                           requirements=Requirements(max_size_mb=0.05), search=FAST, top_k=2, parallel=par,
                           out_dir=str(tmp_path / mode), anchor=False)  # an anchor is a measurement: not repeatable
            assert len(rep["executed"]) == 2 and not rep["failed"]
            assert all("latency_ms" in e["meas"] for e in rep["executed"])  # measured afterwards, one at a time
            content[mode] = _store_content(uri)
            pids = {e["executed_by"]["pid"] for e in rep["executed"]}
            if mode == "serial":
                assert pids == {os.getpid()}
            else:  # the candidates really ran in the cluster's worker processes
                from distributed import Client

                with Client(cluster) as client:
                    assert pids <= set(client.run(os.getpid).values()) and os.getpid() not in pids
    assert len(content["serial"]["runs"]) == len(content["dask"]["runs"])
    for a, b in zip(content["serial"]["runs"], content["dask"]["runs"]):
        for x, y in zip(a, b):
            if x != y and isinstance(x, tuple):
                assert set(x) ^ set(y) == set(), (a[:2], sorted(set(x) ^ set(y)))
        assert a == b
    assert len(content["dask"]["runs"]) == 1 + 2 + min(25, len(rep["pareto"]))


def test_run_command_runs_the_flow_and_prints_the_comparison(harness, mlflow_store, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    args = ["run", "demo:digits-cnn", "--data", "digits", "--max-size-mb", "0.05", "--top-k", "1", "--finetune-epochs",
            "1", "--grid-step", "0.05", "--nsga-evals", "200", "--out-dir", str(tmp_path / "cli")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "executed: predicted vs measured" in r.stdout and "MLflow: run" in r.stdout
    r = CliRunner().invoke(app, args + ["--json", "--no-execute"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["recommended"] and d["executed"] == [] and d["tracking"]["run_id"]
    r = CliRunner().invoke(app, ["run", "demo:digits-cnn", "--max-accuracy-drop", "1", "--out-dir", str(tmp_path / "x")])
    assert r.exit_code == 2 and "needs data" in r.stderr


def test_run_executes_candidates_infeasible_only_by_predicted_accuracy(harness, mlflow_store, tmp_path):
    """Nothing is predicted to reach 12,000 parameters within 0.01 points: the run executes the candidates that meet
    the parameter limit and lets their measurements decide (recommended as measured, or the verdict confirmed)."""
    from typer.testing import CliRunner

    from flows.cli import app

    args = ["run", "demo:digits-cnn", "--data", "digits", "--max-params", "12000", "--max-accuracy-drop", "0.01",
            "--top-k", "2", "--finetune-epochs", "1", "--grid-step", "0.05", "--nsga-evals", "200", "--out-dir",
            str(tmp_path / "cli"), "--json"]
    r = CliRunner().invoke(app, args)
    d = json.loads(r.stdout)
    assert len(d["executed"]) == 2 and [e["compact"] for e in d["executed"]] == [c["compact"] for c in d["verify"]]
    ok = [e for e in d["executed"] if e["meas"]["params"] <= 12000 and e["meas"]["accuracy_drop"] <= 0.01]
    if ok:
        assert r.exit_code == 0 and d["recommended"]["by"] == "measurement"
        assert d["recommended"]["compact"] == min(ok, key=lambda e: e["meas"]["accuracy_drop"])["compact"]
        assert "meets every requirement as measured" in d["predicted_infeasible"]["message"]
    else:
        assert r.exit_code == 3 and d["recommended"] is None
        assert "none of the 2 meets every requirement as measured" in d["infeasible"]["message"]


def test_two_concurrent_runs_on_shared_postgresql_stores(tmp_path):
    """PostgreSQL (Debian's package) on loopback, the Prefect and MLflow servers on it (flows/stores.py), two
    `deployfit run` processes at once: both flow runs and every run and metric of both are in the stores."""
    import shutil
    import socket
    import tempfile
    import urllib.request

    from mlflow.tracking import MlflowClient

    from flows.stores import up

    ports = []
    socks = [socket.socket() for _ in range(3)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    root = tempfile.mkdtemp(prefix="deployfit-stores-")  # under /tmp: the postgres user must reach it
    os.chmod(root, 0o755)
    st = up(root, *ports, say=lambda m: None)
    try:
        procs = []
        for i, (spec, size) in enumerate((("demo:digits-cnn", "0.05"), ("demo:digits-resnet", "0.06"))):
            seed_host(tmp_path / f"cache{i}", key=fresh_process_key())
            env = {**os.environ, **st.env, "DEPLOYFIT_CACHE_DIR": str(tmp_path / f"cache{i}"),
                   "PREFECT_HOME": str(tmp_path / f"home{i}")}
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "flows.cli", "run", spec, "--data", "digits", "--max-size-mb", size, "--top-k", "1",
                 "--finetune-epochs", "1", "--grid-step", "0.05", "--nsga-evals", "200", "--out-dir",
                 str(tmp_path / f"out{i}"), "--json"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True))
        reps = []
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
            assert out.strip().startswith("{"), (out[:2000], err[-2000:])
            reps.append(json.loads(out))
        api = st.env["PREFECT_API_URL"]
        client = MlflowClient(tracking_uri=st.env["MLFLOW_TRACKING_URI"])
        for rep in reps:
            with urllib.request.urlopen(f"{api}/flow_runs/{rep['flow_run_id']}", timeout=10) as r:
                assert json.loads(r.read())["state"]["type"] == "COMPLETED"
            tr = rep["tracking"]
            assert tr["uri"] == st.env["MLFLOW_TRACKING_URI"]
            parent = client.get_run(tr["run_id"])
            assert parent.data.tags["prefect.flow_run_id"] == rep["flow_run_id"]
            assert parent.data.metrics["candidates_evaluated"] == rep["candidates_evaluated"]
            assert "candidates.json" in {a.path for a in client.list_artifacts(tr["run_id"])}
            kids = client.search_runs([tr["experiment_id"]], f"tags.mlflow.parentRunId = '{tr['run_id']}'",
                                      max_results=200)
            assert len(kids) == tr["nested_runs"]
            ex = [k for k in kids if k.data.tags["deployfit.kind"] == "executed"]
            assert len(ex) == 1
            e = rep["executed"][0]
            for k in ("size_bytes", "params", "accuracy", "latency_ms"):
                assert ex[0].data.metrics[f"meas.{k}"] == pytest.approx(e["meas"][k])
            assert {"model.pt2", "strategy.json"} <= {a.path for a in client.list_artifacts(ex[0].info.run_id)}
        assert reps[0]["tracking"]["experiment_id"] != reps[1]["tracking"]["experiment_id"]
    finally:
        st.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_device_measurement_through_the_hardware_work_pool(harness, mlflow_store, tmp_path):
    """A real Prefect server (the harness's) and a process worker on pool deployfit-host, on loopback: the run
    flow sends the executed candidate there; the worker fetches its artifact from the MLflow store, measures it
    and the measured latency comes back into the run's report and the candidate's MLflow run."""
    from mlflow.tracking import MlflowClient
    from prefect.settings import PREFECT_API_URL

    from flows.device import start_worker
    from flows.pipeline import run_flow

    env = {"PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_WORKER_QUERY_SECONDS": "2",
           "MLFLOW_TRACKING_URI": mlflow_store}
    proc = start_worker("host", env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from flows.device import online_workers

        for _ in range(120):  # the worker registers with the API within seconds
            if online_workers("host"):
                break
            assert proc.poll() is None, "the worker exited"
            time.sleep(1)
        rep = run_flow(model=ModelInput(spec="demo:digits-cnn"), data="digits", hardware="host",
                       requirements=Requirements(max_size_mb=0.05), search=FAST, top_k=1, device_measure=True,
                       device_calibrate=True, device_calibrate_budget_s=6, device_timeout_s=240,
                       out_dir=str(tmp_path / "dev"))
        # the profile was calibrated by the worker, came back through the tracking store and was planned with
        assert rep["profile"] == str(tmp_path / "dev" / "profiles" / "host.yaml")
        from hardware.profile import load_profile

        assert load_profile(rep["profile"]).name == "host" and rep["hardware"] == "host"
        e = rep["executed"][0]
        assert e["measured_on"] == "pool deployfit-host" and e["meas"]["latency_ms"] > 0
        rid = rep["tracking"]["executed_runs"][0]
        run = MlflowClient(tracking_uri=mlflow_store).get_run(rid)
        assert run.data.metrics["meas.latency_ms"] == e["meas"]["latency_ms"]
        assert "deployfit.measured_on" in run.data.tags and "err.latency_ms" in run.data.metrics
        # the worker keeps the candidate's ONNX export on the device (for trtexec there) and the report says where
        import onnx

        assert run.data.tags["deployfit.device_onnx"] == e["device_onnx"] and "device-artifacts" in e["device_onnx"]
        onnx.checker.check_model(onnx.load(e["device_onnx"]), full_check=True)
    finally:
        _stop(proc)


def test_no_device_worker_keeps_the_predictions_and_says_so(harness, mlflow_store, tmp_path):
    from flows.device import register
    from flows.pipeline import run_flow

    register("x86-laptop")  # the pool and deployment exist, but no worker serves them
    t0 = time.time()
    rep = run_flow(model=ModelInput(spec="demo:digits-cnn"), data="digits", hardware="x86-laptop",
                   requirements=Requirements(max_size_mb=0.05), search=FAST, top_k=1,  # device_measure: on by default
                   device_timeout_s=600, out_dir=str(tmp_path / "nodev"))
    assert time.time() - t0 < 300  # no worker online: said at once, not after the timeout
    e = rep["executed"][0]
    assert "latency_ms" not in e["meas"] and "latency_ms" in e["pred"] and e["measured_on"] is None
    assert e["meas"]["params"] == e["pred"]["params"]  # everything else was measured where it was built
    assert any("no device worker answered" in n for n in e["notes"])


def test_bad_deployment_files_are_clear_errors(tmp_path):
    from estimators.errors import UserInputError
    from flows.deployments import load_deployments

    for text, words in (("- a\n- b\n", "must be a mapping"), ("deployments: [\n", "is not valid YAML"),
                        ("", "names no deployments"), ("deployments:\n  - name: x\n", "has no entrypoint")):
        f = tmp_path / "d.yaml"
        f.write_text(text)
        with pytest.raises(UserInputError, match=words):
            load_deployments(str(f))
    with pytest.raises(UserInputError, match="does not exist"):
        load_deployments(str(tmp_path / "missing.yaml"))
    assert [d["name"] for d in load_deployments("prefect.yaml")] == ["nightly-digits-cnn", "plan-on-demand"]
