"""How the model commands (flows.cli) print their reports in a terminal: the JSON a command emits under --json
is the same report."""
from __future__ import annotations

from typing import Any

from rich.table import Table

from flows.cli_common import console, err_console, fmt, warn


def print_latency_basis(rep: dict[str, Any]) -> None:
    """Where a latency prediction comes from, and a warning for a profile calibrated on another machine."""
    hw = rep.get("hardware")
    if not hw:
        return
    if hw.get("warning"):
        warn(hw["warning"])
    anc = hw.get("anchor")
    if anc:
        where = " in ONNX Runtime" if hw.get("runtime") == "onnxruntime" else ""
        probe = f", and pruned by half at {anc['probe']['total_ms']} ms" if anc.get("probe") else ""
        console.print(f"latency anchored on the original measured here{where}: {anc['total_ms']} ms at batch {anc['batch']}"
                      f"{probe} (the {hw['name']}{where and ' ONNX Runtime'} profile alone predicted "
                      f"{anc['predicted_ms']} ms; {anc['truths']} "
                      "measured candidates refine it)", highlight=False)
    elif hw.get("anchor_note"):
        console.print(hw["anchor_note"], highlight=False)


def print_onnx(o: dict[str, Any]) -> None:
    agree = f", top-1 agreement {100 * o['top1_agreement']:.2f}%" if "top1_agreement" in o else ""
    console.print(f"ONNX ({o['form']}, opset {o['opset']}): {o['path']}; checker passed; ONNX Runtime outputs within "
                  f"{o['max_rel_diff']:.1e} of the program's range{agree}; stored {fmt(o['size_bytes'])} bytes "
                  f"(the prediction's error {100 * o.get('size_err', 0):+.2f}%)", highlight=False)
    console.print(f"  on a TensorRT machine ({o['tensorrt']}): {o['trtexec']}", highlight=False)


def print_plan(model: str, rep: dict[str, Any], as_json: bool) -> None:
    """A plan's table of its top strategies and its recommendation (nothing under --json: compute emitted it)."""
    if as_json:
        return
    if rep["top"]:
        t = Table(title=f"{model} on {rep['hardware']}: {rep['candidates_evaluated']:,} candidates in {rep['seconds']} s "
                        f"({rep['search']['structured']:,} structured, {rep['search']['nsga2']:,} by NSGA-II)")
        for c in ("strategy", "latency ms", "size MB", "params", "accuracy drop" if rep["accuracy_unit"] == "points"
                  else "accuracy proxy"):
            t.add_column(c, justify="left" if c == "strategy" else "right")
        for r in rep["top"]:
            p = r["pred"]
            t.add_row(r["label"], f"{p['latency_ms']:.3f}", f"{p['size_bytes'] / 1e6:.3f}", f"{p['params']:,}",
                      f"{p['accuracy_drop']:.3f}")
        console.print(t)
        console.print(f"recommended: {rep['recommended']['compact']}; binding: "
                      + (", ".join(b["requirement"] for b in rep["binding"]) or "none"), highlight=False)
    console.print(f"{rep['candidates_evaluated']:,} candidates in {rep['seconds']} s "
                  f"({rep['candidates_per_second']:,.0f}/s); Pareto front: {len(rep['pareto'])} strategies "
                  "(--json lists them)", highlight=False)


def print_run(rep: dict[str, Any]) -> None:
    if rep.get("recommended"):
        console.print(f"recommended: {rep['recommended']['label']}  ({rep['candidates_evaluated']:,} candidates in "
                      f"{rep['seconds']} s)", highlight=False)
        if rep.get("predicted_infeasible"):
            console.print(f"predicted infeasible, settled by measurement: {rep['predicted_infeasible']['message']}",
                          highlight=False)
    else:
        err_console.print(f"infeasible: {rep['infeasible']['message']}", highlight=False)
    if rep.get("executed"):
        t = Table(title="executed: predicted vs measured")
        for c in ("strategy", "metric", "predicted", "measured", "error"):
            t.add_column(c, justify="left" if c in ("strategy", "metric") else "right")
        for e in rep["executed"]:
            keys = [k for k in ("latency_ms", "size_bytes", "params", "accuracy_drop", "onnx_size_bytes")
                    if k in e["meas"] and k in e["pred"]]
            for i, k in enumerate(keys):
                err = e["err"].get(k)
                es = "" if err is None else (f"{err:+.2f} pts" if k.startswith("accuracy") else f"{err:+.1%}")
                show = (lambda v: f"{v:.4g}") if k in ("latency_ms", "accuracy_drop") else fmt
                t.add_row(e["label"] if i == 0 else "", k, show(e["pred"][k]), show(e["meas"][k]), es,
                          end_section=i == len(keys) - 1)
        console.print(t)
    onnx = [e for e in rep.get("executed", []) if (e.get("onnx") or {}).get("path")]
    if onnx:
        console.print(f"ONNX exports, checked in ONNX Runtime (for {onnx[0]['onnx']['tensorrt']}):", highlight=False)
        for e in onnx:
            console.print(f"  {e['label']}: {e['onnx']['path']}  ({e['onnx']['trtexec']})"
                          + (f"; on the device: {e['device_onnx']}" if e.get("device_onnx") else ""), highlight=False)
    for f in rep.get("failed", []):
        err_console.print(f"execution failed: {f['label']}: {f['error']}", highlight=False)
    tr = rep.get("tracking", {})
    if tr.get("run_id"):
        console.print(f"MLflow: run {tr['run_id']} in {tr['uri']}; UI: {tr['link']}", highlight=False)
        if tr.get("registered"):
            r = tr["registered"]
            console.print(f"registered {r['strategy']} as {r['name']} version {r['version']}"
                          + ("" if r["recommended"] else " (the recommendation was not executed: the first executed "
                             "candidate)"), highlight=False)
    else:
        err_console.print(f"tracking store unreachable; results saved under {tr.get('saved_locally')}", highlight=False)
    console.print(f"report: {rep['report_dir']}/report.json; Prefect flow run {rep['flow_run_id']}. "
                  "See both UIs with `deployfit ui`.", highlight=False)
