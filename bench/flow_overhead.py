"""What Prefect and MLflow add to the demo: the `deployfit-run` flow (tasks, result persistence, Prefect
artifact, MLflow parent + nested runs and artifacts) against calling the same pure functions directly
(tasks/pipeline.py: analyze_model, accuracy_sensitivity, search_space, execute_candidate then
measure_latencies, with the arguments the flow gives them), on the demo's
parameters (demo:digits-cnn, digits, host, latency <= 0.25 ms and size <= 0.05 MB, top 3 executed).

Every measured run is a fresh process with fresh caches (no cache hit, no recovery truth carried over), so
both sides do the same work; the timer starts after the imports. The MLflow store (SQLite) exists before
the runs, as a user's does. The flow is measured against a Prefect
server already running (how scheduled and UI-triggered runs meet it), as `deployfit run` runs it (no flow-run
heartbeats: flows.pipeline.terminal_run) and as a served deployment runs it (heartbeats on: Prefect stops their
thread in 1 s sleeps), and, separately, cold: a process with no server, which starts Prefect's ephemeral API
itself. Runs alternate, one warm-up pair first.

    .venv/bin/python bench/flow_overhead.py [--rounds 5] [--model demo:digits-resnet --limits '{"max_size_mb": 0.05}']
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
from search.requirements import Requirements
from tasks.pipeline import (ModelInput, SearchOptions, accuracy_sensitivity, analyze_model, execute_candidate,
                            measure_latencies, search_space)
from flows.pipeline import run_flow, terminal_run
mode, out, spec, limits = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
model, req, opts = ModelInput(spec=spec), Requirements(**limits), SearchOptions()
t0 = time.perf_counter()
if mode == "direct":
    table = analyze_model(model)
    sens = accuracy_sensitivity(model, "digits", table)
    rep = search_space(model, table, "host", req, opts, data="digits", sens=sens, top_k=3)
    # as the flow calls them: every candidate built and trained, then each one's latency timed
    built = [execute_candidate(model, c.compact, f"{out}/a{i}", "host", data="digits",
                               finetune_epochs=opts.finetune_epochs, latency_now=False)
             for i, c in enumerate(rep.top[:3])]
    done = measure_latencies(built, "host")
    top = [c.compact for c in rep.top[:3]]
else:
    kw = dict(model=model, data="digits", hardware="host", requirements=req, search=opts, top_k=3, out_dir=out)
    if mode == "flow":
        with terminal_run():  # as `deployfit run` (the demo) runs it
            rep = run_flow(**kw)
    else:  # "flow-heartbeats": as a served or worker-run deployment runs it
        rep = run_flow(**kw)
    top = [e["compact"] for e in rep["executed"]]
    print("tracking", rep["tracking"].get("seconds"), file=sys.stderr)
print(json.dumps({"seconds": time.perf_counter() - t0, "top": top}))
"""


SPEC = ["demo:digits-cnn", '{"max_latency_ms": 0.25, "max_size_mb": 0.05}']


def run(mode: str, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        e = {**env, "DEPLOYFIT_CACHE_DIR": f"{tmp}/cache", "PREFECT_LOCAL_STORAGE_PATH": f"{tmp}/results",
             "HABANA_LOGS": f"{tmp}/inc"}
        p = subprocess.run([sys.executable, "-c", CHILD, mode, f"{tmp}/out", *SPEC], cwd=REPO, env=e, capture_output=True,
                           text=True, timeout=900)
        if p.returncode:
            raise RuntimeError(p.stdout[-3000:] + p.stderr[-3000:])
        for line in p.stderr.splitlines():
            if line.startswith("tracking "):
                print(f"    ({line} s)")
        return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", default=SPEC[0], help="another model spec (with --limits) to see the cost amortised")
    ap.add_argument("--limits", default=SPEC[1], help="requirements as JSON")
    args = ap.parse_args()
    SPEC[:] = [args.model, args.limits]
    home = tempfile.mkdtemp(prefix="deployfit-overhead-")
    base = {**os.environ, "PREFECT_HOME": f"{home}/prefect", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "TQDM_DISABLE": "1"}
    base.pop("PREFECT_API_URL", None)
    # one MLflow store for all runs, created up front (as a user's store exists before a run)
    base["MLFLOW_TRACKING_URI"] = f"sqlite:///{home}/mlflow.db"
    from mlflow.tracking import MlflowClient

    MlflowClient(base["MLFLOW_TRACKING_URI"]).search_experiments()
    port = 4291
    server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=base, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except Exception:
                time.sleep(0.5)
        served = {**base, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
        # cold runs keep their own Prefect database: the running server would otherwise work through the
        # flow runs and events that the ephemeral APIs write into its database, during the next measured runs
        cold = {**base, "PREFECT_HOME": f"{home}/prefect-cold"}
        print("warm-up (torch/inductor caches) ...", flush=True)
        run("direct", base)
        run("flow", served)
        variants = (("direct", "direct", base), ("flow", "flow", served),
                    ("flow, with heartbeats", "flow-heartbeats", served), ("flow, cold ephemeral API", "flow", cold))
        times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
        tops = set()
        for r in range(args.rounds):
            for name, mode, env in variants:
                res = run(mode, env)
                times[name].append(res["seconds"])
                tops.add(tuple(res["top"]))
                print(f"  round {r + 1} {name:26s} {res['seconds']:6.1f} s", flush=True)
    finally:
        server.terminate()
        server.wait(30)
    d = statistics.median(times["direct"])
    print(f"\nsame top-3 executed by every run: {len(tops) == 1}")
    print(f"{'variant':28s} {'median s':>9s} {'overhead':>9s}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:28s} {m:9.1f} {(m - d) / d:+9.1%}")


if __name__ == "__main__":
    main()
