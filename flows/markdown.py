"""A flow run's Prefect markdown artifact: the recommendation, the top candidates, predicted against measured,
the ONNX exports and where the run is tracked."""
from __future__ import annotations

from typing import Any


def _fmt(v: Any, k: str) -> str:
    if v is None:
        return ""
    if k in HEADERS:
        return f"{v / 1e6:.4f}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


COLUMNS = ("latency_ms", "size_bytes", "params", "macs", "peak_memory_bytes", "accuracy_drop")
HEADERS = {"size_bytes": "size (MB)", "peak_memory_bytes": "peak memory (MB)", "onnx_size_bytes": "ONNX size (MB)"}  # _fmt shows them in MB


def markdown_report(title: str, rep: dict, executed: list[dict], tracked: dict, failed: list[dict] = ()) -> str:
    """The artifact's markdown: `rep` the plan report, `executed` the executed candidates' results, `tracked` where
    the run is tracked (or kept locally), `failed` the candidates whose execution failed."""
    lines = [f"# {title}", ""]
    req = rep.get("requirements", {})
    lines.append(f"Requirements: {', '.join(f'{k} = {v}' for k, v in req.items()) or 'none'}; "
                 f"{rep['candidates_evaluated']:,} candidates in {rep['seconds']} s "
                 f"({rep['candidates_per_second']:,.0f}/s); accuracy as {rep['accuracy_unit']}.")
    ident = rep.get("profile_identity") or {}
    prof = ident.get("profile") or {}
    if prof:
        anchor = ident.get("anchor")
        where = " in ONNX Runtime" if ident.get("runtime") == "onnxruntime" else ""
        lines.append(f"Profile `{prof['name']}` (hash {prof['hash']}" + (f", calibrated {prof['calibrated']} on "
                     f"{prof['cpu']} {prof['isa']}" if prof.get("calibrated") else "") + "); latency "
                     + (f"anchored on the original measured here{where} ({anchor['total_ms']} ms at batch {anchor['batch']}"
                        + (f", pruned by half {anchor['probe']['total_ms']} ms" if anchor.get("probe") else "") + "; "
                        f"the profile alone predicted {anchor['predicted_ms']} ms; {anchor['truths']} measured "
                        "candidates refine it)." if anchor else f"from the profile alone: {ident.get('anchor_note', '')}"))
        if prof.get("warning"):
            lines.append(f"\n**Warning:** {prof['warning']}")
    lines.append("")
    if rep.get("recommended"):
        lines.append(f"**Recommended:** `{rep['recommended']['label']}`; binding: "
                     f"{', '.join(b['requirement'] for b in rep['binding']) or 'none'}")
        if rep.get("predicted_infeasible"):
            lines.append(f"(as measured; predicted infeasible: {rep['predicted_infeasible']['message']})")
    else:
        lines.append(f"**Infeasible:** {rep['infeasible']['message']}")
    lines += ["", "## Top candidates (predicted)", "", "| strategy | " + " | ".join(HEADERS.get(k, k) for k in COLUMNS) + " |",
              "|---" * (len(COLUMNS) + 1) + "|"]
    for r in rep.get("top", []):
        lines.append(f"| `{r['label']}` | " + " | ".join(_fmt(r["pred"].get(k), k) for k in COLUMNS) + " |")
    if executed:
        lines += ["", "## Executed: predicted vs measured", "",
                  "| strategy | metric | predicted | measured | error |", "|---|---|---|---|---|"]
        for e in executed:
            for k in COLUMNS + ("accuracy", "onnx_size_bytes"):
                if k in e["meas"] and k in e["pred"]:
                    err = e["err"].get(k)
                    es = "" if err is None else (f"{err:+.2f} points" if k.startswith("accuracy") else f"{err:+.1%}")
                    lines.append(f"| `{e['label']}` | {HEADERS.get(k, k)} | {_fmt(e['pred'][k], k)} | {_fmt(e['meas'][k], k)} | {es} |")
        onnx = [e for e in executed if (e.get("onnx") or {}).get("path")]
        if onnx:
            lines += ["", f"## ONNX exports (checked in ONNX Runtime; for {onnx[0]['onnx']['tensorrt']})", ""]
            for e in onnx:
                o = e["onnx"]
                where = (f"; on the device at `{e['device_onnx']}`" if e.get("device_onnx") else "")
                lines.append(f"- `{e['label']}`: `{o['path']}` ({o['form']}){where}; on the TensorRT machine: "
                             f"`{o['trtexec']}`")
    for f in failed:
        lines.append(f"\n**Execution failed:** `{f['label']}`: {f['error']}")
    lines.append("")
    if tracked.get("run_id"):
        lines.append(f"MLflow run {tracked['run_id']} in {tracked['uri']} ({tracked['nested_runs']} nested runs): "
                     f"[open in the MLflow UI]({tracked['link']})"
                     + (" (start it with `deployfit ui`)" if not tracked["uri"].startswith("http") else ""))
    else:
        lines.append(f"Tracking store {tracked.get('uri')} unreachable ({tracked.get('error')}): results saved "
                     f"locally under `{tracked.get('saved_locally')}`.")
    return "\n".join(lines)
