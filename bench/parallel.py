"""Executing candidates serially against on 2 Dask workers: wall time and ratio.

Four digits-resnet candidates (fine-tuning, distillation, INT8 calibration and export; 5 epochs) are built
the way the `run` flow builds them: serially in this process (torch on all cores), and as the
`deployfit-execute` flow on a prefect-dask DaskTaskRunner over a local cluster of 2 worker processes (1
torch thread each). Latency is measured afterwards in both cases, one candidate at a time, and is not
part of either time. Prints the times (with and without the cluster's start) and the ratio.

    .venv/bin/python bench/parallel.py [--workers 2] [--epochs 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

CANDIDATES = ["prune:0.3,quantize:int8", "prune:0.5:global,quantize:int8", "distill:width:0.5,quantize:int8",
              "prune:0.6"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="deployfit-parallel-")
    os.environ.setdefault("PREFECT_HOME", f"{tmp}/prefect")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["DEPLOYFIT_CACHE_DIR"] = f"{tmp}/cache"
    os.environ.setdefault("HABANA_LOGS", f"{tmp}/inc")
    from distributed import LocalCluster
    from prefect_dask import DaskTaskRunner

    from flows.pipeline import execute_flow
    from tasks.pipeline import ModelInput, execute_candidate

    model = ModelInput(spec="demo:digits-resnet")

    def warm(folder: str) -> None:  # imports, INC and export set-up, once per process, outside the timings
        execute_candidate(model, "quantize:int8", folder, "host", data="digits", finetune_epochs=1, latency_now=False)

    warm(f"{tmp}/warm")
    from prefect import flow

    flow(lambda: None, name="start-api")()  # the Prefect API is up before either timing
    t0 = time.perf_counter()
    serial = [execute_candidate(model, c, f"{tmp}/s{i}", "host", data="digits", finetune_epochs=args.epochs,
                                latency_now=False) for i, c in enumerate(CANDIDATES)]
    t_serial = time.perf_counter() - t0
    print(f"serial (this process, {os.cpu_count()} cores): {t_serial:.1f} s", flush=True)
    t0 = time.perf_counter()
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        runner = execute_flow.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))
        per = max(1, (os.cpu_count() or 1) // args.workers)
        # warm-up: one short candidate per worker (imports, INC, Prefect's task engine in the worker)
        runner(model, [{"compact": "quantize:int8", "label": "warm-up", "out_dir": f"{tmp}/w{i}"}
                       for i in range(args.workers)], tmp, "host", 1, "digits", 1, per)
        t_up = time.perf_counter() - t0
        cands = [{"compact": c, "label": c, "out_dir": f"{tmp}/p{i}"} for i, c in enumerate(CANDIDATES)]
        t1 = time.perf_counter()
        built = runner(model, cands, tmp, "host", 1, "digits", args.epochs, per)
        t_par = time.perf_counter() - t1
    assert not any(isinstance(b, dict) for b in built), built  # a failure is a dict with its error
    print(f"{args.workers} Dask workers: {t_par:.1f} s for the candidates (+ {t_up:.1f} s to start the cluster and "
          "warm its workers up, once per cluster)")
    print(f"ratio serial / parallel: {t_serial / t_par:.2f}x ({t_serial / (t_par + t_up):.2f}x with a fresh cluster)")
    for s, p in zip(serial, built):
        print(f"  {s.compact:34s} accuracy serial {s.meas.accuracy:.2f}%  parallel {p.meas.accuracy:.2f}%"
              f"  ({'same' if s.meas.size_bytes == p.meas.size_bytes else 'different'} size)")


if __name__ == "__main__":
    main()
