"""What a flow run records, independent of the store: run names, the parent's description with its links, metric
names (pred., meas., err.), the Pareto plot and the files of a run's bundle (plan, candidates, executed results)."""
from __future__ import annotations

import json
from pathlib import Path

from estimators.strategy import parse_strategy

ML_VIEW = "workflowType=machine_learning"
PARETO_RUNS = 25  # nested runs for the front (the whole front is in pareto.json and candidates.json)


def prefixed_metrics(prefix: str, d: dict | None) -> dict[str, float]:
    return {f"{prefix}.{k}": float(v) for k, v in (d or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def err_metrics(e: dict) -> dict[str, float]:
    """An executed candidate's errors as MLflow metrics: `err.K` is always relative, (pred - meas) / meas; a metric
    in percentage points (accuracy, accuracy drop) also has its difference in points as `err.K_points` (an
    accuracy drop near zero has no meaningful relative error, so it has the points only)."""
    from estimators.report import POINTS

    pred, meas, out = e.get("pred") or {}, e.get("meas") or {}, {}
    for k, v in (e.get("err") or {}).items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if k in POINTS:
            out[f"err.{k}_points"] = float(v)
            if k != "accuracy_drop" and meas.get(k) and k in pred:
                out[f"err.{k}"] = (float(pred[k]) - float(meas[k])) / float(meas[k])
        else:
            out[f"err.{k}"] = float(v)
    return out


def run_name(record: dict, plan: dict) -> str:
    """The parent run's name: the flow run's (model, hardware, time, or the name it was triggered with) and the
    recommended strategy."""
    base = record.get("run_name") or f"{record['model']} on {record['hardware']}"
    rec = plan.get("recommended")
    return f"{base}: {rec['label'] if rec else 'infeasible'}"[:250]


def child_name(kind: str, row: dict) -> str:
    """A nested run's name: its kind, a short hash of the full strategy (labels of per-layer strategies
    abbreviate, so two can read alike) and the readable label."""
    import hashlib

    h = hashlib.sha256(row["compact"].encode()).hexdigest()[:6]
    return f"{kind} {h}: {row.get('label', row['compact'])}"[:250]


def description(record: dict, plan: dict) -> str:
    """The parent run's description (markdown): what is recommended and why, and what the latency rests on."""
    rec = plan.get("recommended")
    lines = [f"**{record['flow']}** `{record['model']}` on `{record['hardware']}`, data `{record.get('data')}`."]
    if rec:
        binding = ", ".join(b["requirement"] for b in plan.get("binding") or []) or "none"
        lines.append(f"**Recommended:** `{rec['label']}` (`{rec['compact']}`), the least predicted accuracy drop "
                     f"among those meeting every requirement; binding requirements: {binding}.")
    elif plan.get("infeasible"):
        lines.append(f"**Infeasible:** {plan['infeasible'].get('message', '')}")
    req = record.get("requirements") or {}
    lines.append("Requirements: " + (", ".join(f"{k} = {v}" for k, v in req.items()) or "none") + ".")
    ident = plan.get("profile_identity") or {}
    prof, anchor = ident.get("profile") or {}, ident.get("anchor")
    if prof:
        lines.append(f"Latency: profile `{prof.get('name')}` (hash {prof.get('hash')}), "
                     + (f"anchored on the original measured here ({anchor['total_ms']} ms)." if anchor else
                        "the profile alone."))
    return "\n\n".join(lines)


def best_executed(executed: list[dict], requirements: dict) -> int | None:
    """The executed candidate a reviewer wants first: of those that meet every requirement as measured, the one
    with the least measured accuracy drop (None where none does)."""
    from search.requirements import Requirements, broken_as_measured

    req = Requirements(**requirements)
    ok = [i for i, e in enumerate(executed) if e.get("meas") and not e.get("error")
          and not broken_as_measured(e["meas"], req)]
    return min(ok, key=lambda i: executed[i]["meas"].get("accuracy_drop", 0.0)) if ok else None


def executed_line(executed: list[dict], runs: dict[int, str], requirements: dict, experiment_id: str) -> str:
    """The parent run's description line that links the best executed candidate's run (markdown link within the
    UI): from the start page, the experiment, the parent run, this link."""
    if not executed:
        return ""
    best = best_executed(executed, requirements)
    if best is None or best not in runs:
        return f"**Executed:** none of the {len(executed)} executed candidates meets every requirement as measured."
    e = executed[best]
    meas = e["meas"]
    parts = [f"accuracy drop {meas['accuracy_drop']:+.2f} points" if "accuracy_drop" in meas else "",
             f"latency {meas['latency_ms']:.3f} ms" if "latency_ms" in meas else "",
             f"size {meas['size_bytes'] / 1e6:.3f} MB" if "size_bytes" in meas else ""]
    return (f"**Best executed:** [{e.get('label', e['compact'])}](#/experiments/{experiment_id}/runs/{runs[best]}?"
            f"{ML_VIEW}) meets every requirement as measured ({', '.join(p for p in parts if p)}); "
            f"{len(executed)} executed.")


def flat_params(prefix: str, d: dict) -> dict[str, str]:
    return {f"{prefix}.{k}": str(v) for k, v in d.items() if v is not None}


def pareto_plot(plan: dict, executed: list[dict], path: Path) -> Path:
    """Predicted latency against predicted accuracy drop for the front; executed candidates marked at their
    predicted and measured points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    front = plan.get("pareto", [])
    if front:
        ax.scatter([p["pred"]["latency_ms"] for p in front], [p["pred"]["accuracy_drop"] for p in front], s=10,
                   c="#7aa6c2", label=f"Pareto front, predicted ({len(front)})")
    for i, e in enumerate(executed):
        p, m = e["pred"], e["meas"]
        if "latency_ms" in p and "accuracy_drop" in p:
            ax.scatter([p["latency_ms"]], [p["accuracy_drop"]], marker="o", facecolors="none", edgecolors="#c0392b",
                       s=60, label="executed, predicted" if i == 0 else None)
        if "latency_ms" in m and "accuracy_drop" in m:
            ax.scatter([m["latency_ms"]], [m["accuracy_drop"]], marker="x", c="#c0392b", s=60,
                       label="executed, measured" if i == 0 else None)
            if "latency_ms" in p and "accuracy_drop" in p:
                ax.plot([p["latency_ms"], m["latency_ms"]], [p["accuracy_drop"], m["accuracy_drop"]], c="#c0392b",
                        lw=0.6, alpha=0.6)
    for i, e in enumerate(executed):  # each executed point named by its number in the run's executed list
        at = e["meas"] if "latency_ms" in e["meas"] and "accuracy_drop" in e["meas"] else e["pred"]
        if "latency_ms" in at and "accuracy_drop" in at:
            ax.annotate(f"#{i + 1} {e.get('label', e['compact'])}"[:48], (at["latency_ms"], at["accuracy_drop"]),
                        xytext=(5, 4), textcoords="offset points", fontsize=7, color="#7b241c")
    req = plan.get("requirements") or {}
    if req.get("max_latency_ms") is not None:
        ax.axvline(req["max_latency_ms"], color="#555555", ls="--", lw=0.9,
                   label=f"max latency {req['max_latency_ms']} ms")
    if req.get("max_accuracy_drop") is not None:
        ax.axhline(req["max_accuracy_drop"], color="#555555", ls=":", lw=0.9,
                   label=f"max accuracy drop {req['max_accuracy_drop']}")
    unit = "points" if plan.get("accuracy_unit") == "points" else "proxy"
    rec = plan.get("recommended")
    ax.set_title(f"{plan.get('model', '')} on {plan.get('hardware')}: {plan.get('candidates_evaluated', 0):,} "
                 "candidates" + (f"\nrecommended {rec['label']}"[:90] if rec else "; none meets every requirement"),
                 fontsize=9)
    ax.set_xlabel(f"latency on {plan.get('hardware')} (ms)")
    ax.set_ylabel(f"accuracy drop ({unit})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def candidate_columns(rows: list[dict]) -> dict[str, list]:
    """Rows as an MLflow table (columns of values): numbers stay numbers, so the UI sorts them as numbers; nested
    values become JSON text."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = {}
    for k in keys:
        col = [r.get(k) for r in rows]
        if any(isinstance(v, (dict, list, tuple)) for v in col):
            col = [None if v is None else json.dumps(v, default=str) for v in col]
        out[k] = col
    return out


def prefect_link(flow_run_id: str | None) -> str | None:
    """The Prefect UI page of a flow run, where the API is a server (a temporary one has no UI: `deployfit ui`
    serves its database)."""
    if not flow_run_id:
        return None
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()
    if not ui:
        api = PREFECT_API_URL.value() or ""
        ui = api[:-4] if api.endswith("/api") else "http://127.0.0.1:4200"
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}"


def pareto_subset(front: list[dict], n: int = PARETO_RUNS) -> list[dict]:
    if len(front) <= n:
        return front
    by_lat = sorted(front, key=lambda p: p["pred"]["latency_ms"])
    idx = sorted({round(i * (len(by_lat) - 1) / (n - 1)) for i in range(n)})
    return [by_lat[i] for i in idx]


def write_bundle(folder: Path, record: dict, plan: dict, executed: list[dict], layers: list[dict],
                 plot: bool = True) -> Path:
    """Everything a run logs, as files: record.json (params, tags), plan.json, candidates.json, layers.json,
    pareto.png (unless `plot` is false) and per executed candidate its strategy and result."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "record.json").write_text(json.dumps(record, indent=1, default=str))
    (folder / "plan.json").write_text(json.dumps({k: v for k, v in plan.items() if k != "candidates"}, default=str))
    (folder / "candidates.json").write_text(json.dumps(plan.get("candidates", {}), default=str))
    (folder / "layers.json").write_text(json.dumps(layers, default=str))
    for i, e in enumerate(executed):
        write_executed(folder, i, e)
    if plot:
        pareto_plot(plan, executed, folder / "pareto.png")
    return folder


def write_executed(folder: Path, i: int, e: dict) -> Path:
    sub = folder / f"executed-{i}"
    sub.mkdir(exist_ok=True)
    strategy = e.get("strategy") or parse_strategy(e["compact"]).model_dump(exclude_none=True)
    (sub / "strategy.json").write_text(json.dumps(strategy, indent=1))
    (sub / "result.json").write_text(json.dumps({k: v for k, v in e.items() if k != "log"}, default=str))
    return sub
