"""The MLflow and Prefect UIs as a person sees them, in a real browser (Playwright on Debian's Chromium): a real
`deployfit run` on a new store, `deployfit ui`'s servers over it, and the pages a reviewer opens. Skipped, with the
reason, only where Chromium or Playwright is not installed (`.ci/run` installs both)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.reaper import stop_processes
from hosts import fresh_process_key, free_ports, seed_host

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

try:
    import playwright.sync_api  # noqa: F401
    PLAYWRIGHT = True
except ImportError:
    PLAYWRIGHT = False

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM, reason="Chromium is not installed (apt-get install chromium)"),
              pytest.mark.skipif(not PLAYWRIGHT, reason="Playwright is not installed (pip install playwright)")]


def test_a_run_reads_in_the_mlflow_and_prefect_uis(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    from flows.deployments import start_uis

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    seed_host(tmp_path / "cache", key=fresh_process_key())
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "DEPLOYFIT_CACHE_DIR": str(tmp_path / "cache"),
           "MLFLOW_TRACKING_URI": store}
    env.pop("PREFECT_API_URL", None)
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "demo:digits-cnn", "--data", "digits",
                          "--max-size-mb", "0.05", "--top-k", "2", "--finetune-epochs", "1", "--grid-step", "0.05",
                          "--nsga-evals", "200", "--out-dir", str(tmp_path / "runs"), "--json"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rep = json.loads(out.stdout)
    tr = rep["tracking"]
    client = MlflowClient(tracking_uri=store)
    parent = client.get_run(tr["run_id"])
    name = parent.data.tags["mlflow.runName"]
    executed = tr["executed_runs"]

    for k, v in {"PREFECT_HOME": str(tmp_path / "prefect"), "MLFLOW_TRACKING_URI": store}.items():
        monkeypatch.setenv(k, v)
    pp, mp = free_ports(2)
    procs = start_uis(pp, mp, say=lambda m: None, block=False)
    ml, pf = f"http://127.0.0.1:{mp}", f"http://127.0.0.1:{pp}"
    view = "workflowType=machine_learning"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])

            def visit(url: str):
                """A fresh page per view: the UI routes by the URL's fragment, which a goto within one page does not
                reload."""
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(url)
                return page


            # the experiment opens on its runs (model training, not GenAI traces), the run under its name
            page = visit(f"{ml}/#/experiments/{tr['experiment_id']}?{view}")
            page.get_by_text(name[:20]).first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "experiment.png"))
            assert page.title().startswith("Runs")  # the runs table, not the GenAI overview

            # the parent run: its name, its description with the recommendation, its nested runs named apart
            assert tr["link"].endswith(f"/#/experiments/{tr['experiment_id']}/runs/{tr['run_id']}?{view}")
            page = visit(f"{ml}/#/experiments/{tr['experiment_id']}/runs/{tr['run_id']}?{view}")
            page.get_by_text("Recommended:").first.wait_for(timeout=60_000)
            assert page.get_by_text(name).count() >= 1
            kids = client.search_runs([tr["experiment_id"]], f"tags.mlflow.parentRunId = '{tr['run_id']}'")
            names = [k.data.tags["mlflow.runName"] for k in kids]
            assert len(set(names)) == len(names)
            page.screenshot(path=str(tmp_path / "parent.png"))

            # the Pareto plot renders as an image
            page = visit(f"{ml}/#/experiments/{tr['experiment_id']}/runs/{tr['run_id']}/artifacts/pareto.png?{view}")
            page.wait_for_function("() => [...document.images].some(i => i.complete && i.naturalWidth > 300)",
                                   timeout=60_000)

            # the candidates table renders as a table
            page = visit(f"{ml}/#/experiments/{tr['experiment_id']}/runs/{tr['run_id']}/artifacts/candidates.json?{view}")
            page.get_by_text("View as table").first.wait_for(timeout=60_000)
            page.get_by_role("columnheader", name="size_bytes").first.wait_for(timeout=60_000)

            # an executed candidate: its relative errors
            page = visit(f"{ml}/#/experiments/{tr['experiment_id']}/runs/{executed[0]}?{view}")
            page.get_by_text("err.latency_ms").first.wait_for(timeout=60_000)

            # the best executed candidate in three clicks from the start page, no column configured: the experiment,
            # the parent run, the description's link (it opens a tab). MLflow 3 opens on its GenAI view until the
            # browser has chosen "Model training" once (it keeps the choice), so a first visit clicks that first.
            best = MlflowClient(tracking_uri=store).get_run(tr["run_id"]).data.tags["deployfit.best_executed_run"]
            page = visit(f"{ml}/#/")
            page.get_by_text("Model training").first.click(timeout=60_000)
            page.get_by_text("deployfit/demo:digits-cnn/host").first.click(timeout=60_000)
            page.get_by_text(name[:20]).first.click(timeout=60_000)
            label = client.get_run(best).data.tags["deployfit.label"]
            page.get_by_text("Best executed:").first.scroll_into_view_if_needed(timeout=60_000)
            page.screenshot(path=str(tmp_path / "best-link.png"))
            with page.context.expect_page(timeout=60_000) as opened:
                page.get_by_role("link", name=label).first.click(timeout=60_000)
            page = opened.value
            page.get_by_text("err.latency_ms").first.wait_for(timeout=60_000)
            assert f"/runs/{best}" in page.url
            page.screenshot(path=str(tmp_path / "best.png"))

            # the executed runs sorted by their latency error (the URL a click on the column's header leaves)
            err = {client.get_run(r).data.tags["mlflow.runName"]: client.get_run(r).data.metrics["err.latency_ms"]
                   for r in executed}
            page = visit(f"{ml}/#/experiments/{tr['experiment_id']}/runs?{view}&orderByKey=metrics.%60err.latency_ms%60"
                         "&orderByAsc=true&searchFilter=tags.deployfit.kind%20%3D%20%27executed%27")
            for lab in err:
                page.get_by_text(lab[:20]).first.wait_for(timeout=60_000)
            # the errors in on-screen order (runs of equal error may show in either order); the list can render
            # before its sort is applied, so the order is read again until it settles or 30 s pass
            for _ in range(60):
                shown = sorted(err, key=lambda lab: page.get_by_text(lab[:20]).first.bounding_box()["y"])
                if [err[lab] for lab in shown] == sorted(err.values()):
                    break
                page.wait_for_timeout(500)
            assert [err[lab] for lab in shown] == sorted(err.values()), [(lab, err[lab]) for lab in shown]
            page.screenshot(path=str(tmp_path / "sorted.png"))

            # the Prefect flow run, under the same name as the MLflow parent run
            page = visit(f"{pf}/runs/flow-run/{rep['flow_run_id']}")
            page.get_by_text(name.split(": ")[0]).first.wait_for(timeout=60_000)
            page.get_by_text("Task Runs", exact=True).first.click(timeout=60_000)  # its tasks, as a reviewer checks
            page.get_by_text("measure latency").first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "prefect.png"))
            browser.close()
    finally:
        stop_processes(procs, 30)
