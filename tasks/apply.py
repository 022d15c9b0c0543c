"""apply: execute a strategy, save the artifact, measure it and compare with the prediction."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from estimators.analyze import analyze
from estimators.compress import estimate
from estimators.errors import UserInputError
from estimators.modelspec import LoadedModel, shape_json
from estimators.report import public
from estimators.strategy import Strategy, check_executable
from estimators.table import totals
from hardware.measure import (count_module, gemm_macs, measure_memory_access_bytes, measure_peak_activation_bytes,
                              stored_tensor_bytes, stored_tensors)
from search.results import CandidateResult, Measurement, Prediction

from .anchoring import latency_context
from .executors import Work, check_out_dir, run_strategy, save_artifact
from .quantize_exec import load_program

EXPORT_FORMS = ("pt2", "onnx")


def check_export_forms(forms, runtime: str = "pytorch") -> tuple[str, ...]:
    """The export forms asked for, each once (with `onnx` for the ONNX Runtime runtime, whose latency is
    model.onnx's); an error naming any this cannot write."""
    unknown = set(forms) - set(EXPORT_FORMS)
    if unknown:
        raise UserInputError(f"unknown export format(s) {', '.join(sorted(unknown))}: choose from "
                             f"{', '.join(EXPORT_FORMS)}")
    return tuple(dict.fromkeys([*forms, *(["onnx"] if runtime == "onnxruntime" else [])]))


def as_built(strategy: Strategy, float_layers: list[str], table) -> Strategy:
    """`strategy` with its quantize step's keep_float set to the layers the quantizer really left in float, those
    the layer table has (a module called through a functional form, as nn.MultiheadAttention's out_proj, is not a
    row of it and is not quantized by the estimate either): what the prediction of the built artifact follows.
    The same `strategy` where those are the layers it names already."""
    known = set(table.module_names)
    kept = [n for n in float_layers if n in known]
    if all(set(kept) == set(s.keep_float) for s in strategy.steps if s.method == "quantize"):
        return strategy
    return strategy.model_copy(update={"steps": [s.model_copy(update={"keep_float": kept})
                                                 if s.method == "quantize" else s for s in strategy.steps]})


def measure_work(work: Work, ep, artifact_path: str) -> tuple[dict[str, Any], list[str]]:
    """Measure the real artifact `ep` (loaded back from `artifact_path`) and the compressed module it was made from."""
    notes: list[str] = []
    ex = work.example()
    meas: dict[str, Any] = {}
    counted = count_module(work.model, ex)  # parameters and MACs of the compressed float module
    meas.update(counted)
    meas["size_bytes"] = stored_tensor_bytes(ep)
    meas["artifact_file_bytes"] = Path(artifact_path).stat().st_size
    run = ep.module()
    meas["gemm_macs"] = gemm_macs(run, ex)
    quantized = work.quant is not None and work.quant.dtype in ("int8", "int8-weight-only")
    if quantized:
        notes.append("params and macs are counted on the float module before quantization (quantization keeps them); "
                     "memory access and peak memory are not measured on the eager Q/DQ graph, which is not the form an "
                     "int8 model is deployed in")
    else:
        weights = [t for _, t in stored_tensors(ep)]
        meas["memory_access_bytes"] = measure_memory_access_bytes(run, ex)
        meas["peak_memory_bytes"] = meas["size_bytes"] + measure_peak_activation_bytes(run, ex, weights)
    return meas, notes


def fast_form(ep, int8: bool):
    """A saved program in the form that runs it fast: eager for float programs, inductor-compiled (freezing) for
    INT8 ones (its first call compiles it)."""
    if int8:
        from .quantize_exec import compile_for_inference

        return compile_for_inference(ep)
    return ep.module()


def _is_int8(strategy: dict[str, Any]) -> bool:
    return any(s.get("method") == "quantize" and s.get("dtype") == "int8" for s in strategy["steps"])


def measure_candidate(fn, loaded: LoadedModel, batch_size: int, anchor=None, original=None,
                      original_after=None, int8: bool = False, rounds: int | None = None,
                      progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """The latency of a candidate's fast form `fn` on this machine, timed in alternation with the original
    (tasks.anchoring.measure_against_original): the ratio of the two is what the machine's drift barely moves.
    With `anchor` (the original measured when the prediction was anchored), the latency is that ratio times the
    anchor's measurement of the original, the scale the anchored prediction is on; without, the candidate's own
    median in this window. An INT8 candidate (`int8`) of an anchor with an INT8 point is timed against the INT8
    original (tasks.anchoring.int8_reference) and put on that point's scale: a compiled INT8 graph's ratio to the
    eager float original moved by up to 8% from one minute to the next here (the machine's state moves the two
    runtimes differently), where two INT8 builds timed together stayed within 3-5% of each other."""
    from .anchoring import int8_reference, measure_against_original

    point = anchor.runtimes.get("int8") if anchor is not None and int8 else None
    if point is not None:
        ref = int8_reference(loaded, anchor, progress)
        got = measure_against_original(fn, loaded, batch_size, rounds=rounds, original=ref)
        to_float = point["measured_ms"] / anchor.total_ms  # the ratios to the float original, on the anchor's scale
        got.update(ratio=got["ratio"] * to_float, ratio_iqr=got["ratio_iqr"] * to_float, reference="INT8 original",
                   window_ms=got["latency_ms"])
        got["latency_ms"] = got["ratio"] * anchor.total_ms
        got["scale"] = ("anchor: ratio to the INT8 original x the INT8 original's anchored latency "
                        f"({point['measured_ms']:.4g} ms)")
        return got
    got = measure_against_original(fn, loaded, batch_size, rounds=rounds, original=original,
                                   original_after=original_after)
    got.update(reference="original", window_ms=got["latency_ms"])
    got["latency_ms"] = got["ratio"] * anchor.total_ms if anchor is not None else got["latency_ms"]
    got["scale"] = "anchor: ratio to the original x the original's anchored latency" if anchor is not None \
        else "this window's median"
    return got


def record_latency(result: CandidateResult, lat: dict[str, Any], anchor) -> CandidateResult:
    """`result` completed with the latency measurement `lat` (measure_candidate): meas.latency_ms and
    meas.speedup (the original's latency over the candidate's, measured in alternation); a measured candidate is
    a truth of the anchor (hardware.anchor.Anchor.record_truth), whose correction it refits."""
    meas = result.meas.model_copy(update={"latency_ms": round(lat["latency_ms"], 4),
                                          "speedup": round(1 / lat["ratio"], 4)})
    if anchor is not None and result.pred_latency_before_truths_ms:
        anchor.record_truth(result.compact, result.latency_runtime, result.pred_latency_before_truths_ms,
                            lat["latency_ms"])
    return result.model_copy(update={"meas": meas, "latency_measurement": lat})


def predict_host_latency(loaded: LoadedModel, table, est, hardware: str, batch_size: int, anchor_on: bool,
                         progress: Callable[[str], None] = lambda m: None, runtime: str = "pytorch") -> tuple:
    """The latency prediction of `est` (the candidate's estimated table) on `hardware`: (the profile, its anchor or
    None, {latency_ms, latency_basis, hardware, latency_runtime, pred_latency_before_truths_ms})."""
    from hardware.anchor import runtime_of
    from hardware.latency import predict_latency

    prof, anchor, info = latency_context(loaded, table, hardware, batch_size, anchor_on, progress, runtime=runtime)
    lat = predict_latency(est, prof, batch_size, anchor=anchor)
    out = {"latency_ms": round(lat.latency_ms, 4), "latency_basis": lat.basis, "hardware": info,
           "latency_runtime": runtime_of(est)}
    if anchor is not None:  # what a truth is recorded against: the anchored prediction before the truths' refit
        out["pred_latency_before_truths_ms"] = lat.latency_ms / anchor.truth_factor(runtime_of(est))[0]
    return prof, anchor, out


def saved_latency(model_path: str, strategy: dict[str, Any], input_shape: list, batch_size: int,
                  trust_pickle: bool = False) -> dict[str, Any]:
    """Latency of a saved artifact, loaded from `model_path`, on the seeded example input at `batch_size` (one per
    input where `input_shape` lists several shapes, as a result's JSON does), in the form that runs it fast (a
    device worker measures what it fetched with this). An artifact that needs pickle is refused unless
    `trust_pickle`."""
    from estimators.modelspec import seeded_input
    from hardware.measure import measure_latency

    fn = fast_form(load_program(model_path, trust_pickle), _is_int8(strategy))
    return measure_latency(fn, seeded_input(input_shape, batch_size), warmup=3, min_runs=10, budget_s=3.0)


def measure_saved_latency(result: CandidateResult, loaded: LoadedModel, anchor_on: bool = True,
                          progress: Callable[[str], None] = lambda m: None, table=None,
                          original=None, runtime: str = "pytorch") -> CandidateResult:
    """Predict and measure the latency of an artifact `apply_and_measure(..., latency_now=False)` saved, on this
    machine: the prediction anchored as apply's, the measurement in alternation with the original `loaded`
    (measure_candidate); completes its `pred`, `meas` and `err` (the result is returned updated). `table` (the
    original's analysis) and `original` (its artifact's module, tasks.anchoring.original_program): built here when
    not given, once by a caller measuring several candidates of one model. `runtime` `onnxruntime`: the
    candidate's model.onnx, predicted and timed in ONNX Runtime against the original's session (`original` is
    then not used)."""
    strat = Strategy.model_validate(result.strategy)
    table = table if table is not None else analyze(loaded)
    if result.float_layers:  # what was really built (apply_and_measure)
        strat = as_built(strat, result.float_layers, table)
    _, anchor, extra = predict_host_latency(loaded, table, estimate(table, strat), "host", result.batch_size,
                                            anchor_on, progress, runtime)
    predicted = extra.pop("latency_ms")
    notes = [n for n in result.notes if not n.startswith("latency to be predicted")] \
        + ([extra["hardware"]["warning"]] if extra["hardware"].get("warning") else [])
    # a plan's executed candidate keeps the prediction that chose it (flows.pipeline._with_plan_prediction)
    pred = result.pred if result.pred.latency_ms is not None else result.pred.model_copy(update={"latency_ms": predicted})
    out = result.model_copy(update={"pred": pred, "notes": notes, **extra})
    if runtime == "onnxruntime":
        lat = onnx_latency((result.onnx or {}).get("path"), loaded, result.batch_size, anchor, notes, progress)
        return record_latency(out, lat, anchor) if lat is not None else out
    fn = fast_form(load_program(result.artifact["model"], loaded.trust_pickle), _is_int8(result.strategy))
    return record_latency(out, measure_candidate(fn, loaded, result.batch_size, anchor, original,
                                                 int8=_is_int8(result.strategy), progress=progress), anchor)


def onnx_latency(onnx_path: str | None, loaded: LoadedModel, batch_size: int, anchor, notes: list[str],
                 progress: Callable[[str], None]) -> dict[str, Any] | None:
    """A candidate's model.onnx timed in ONNX Runtime in alternation with the original's session (on the anchor's
    scale); None, with the reason in `notes`, without an anchor or a model.onnx."""
    if anchor is None:
        notes.append("latency in ONNX Runtime is measured against the original's ONNX Runtime anchor: not "
                     "measured with --no-anchor")
        return None
    if not onnx_path:
        notes.append("latency in ONNX Runtime not measured: the candidate has no model.onnx")
        return None
    from .onnx_runtime import measure_onnx_candidate

    progress(f"measuring model.onnx in ONNX Runtime at batch {batch_size} in alternation with the original")
    return measure_onnx_candidate(onnx_path, loaded, batch_size, anchor)


def artifact_accuracy(ep, data) -> float:
    """Top-1 accuracy of a saved artifact on the validation data, run as the program it is."""
    from estimators.data import accuracy

    return accuracy(ep.module(), data.val, set_eval=False)


def apply_and_measure(loaded: LoadedModel, strategy: Strategy, out_dir: str, hardware: str | None = None,
                      batch_size: int = 1, progress: Callable[[str], None] = lambda m: None, data_spec: str | None = None,
                      train_cfg: Any = None, latency_now: bool = True, anchor_on: bool = True,
                      export: tuple[str, ...] = ("pt2",), onnx_required: bool = True,
                      runtime: str = "pytorch") -> CandidateResult:
    """`export`: the forms written beside strategy.json: `pt2` (always written: it is what is measured) and
    `onnx` (tasks.onnx_export: model.onnx, verified in ONNX Runtime, its size against the prediction); an export
    that fails is an error when `onnx_required`, else a note and `onnx: {error}` in the result. `runtime`
    `onnxruntime`: the latency predicted and measured is model.onnx's in ONNX Runtime (tasks.onnx_runtime; the
    export is then written whatever `export` says).
    `latency_now=False`: predict the latency but leave measuring it to `measure_saved_latency` (a
    pipeline that builds candidates in parallel measures them one at a time afterwards). `anchor_on`: predict the
    latency anchored on the original measured here (tasks.anchoring), where the hardware is this machine."""
    export = _checked(loaded, strategy, out_dir, hardware, data_spec, export, runtime)
    progress(f"analysing {loaded.spec}")
    table = analyze(loaded)
    est = estimate(table, strategy)
    pred = public(totals(est))
    acc = _Accuracy.before(loaded, table, strategy, data_spec, train_cfg, pred, progress)
    progress(f"executing {strategy.compact()}")
    work = run_strategy(loaded, strategy, data=acc.data, train_cfg=acc.train_cfg, progress=progress)
    pred_before_tuning = None
    qstep = next((s for s in strategy.steps if s.method == "quantize"), None)
    tuned = as_built(strategy, work.quant.float_layers, table) if work.quant is not None else strategy
    if qstep is not None and qstep.dtype == "int8" and tuned is not strategy:
        # layers the quantizer (autotune) left in float: the prediction follows what was really built
        pred_before_tuning = dict(pred)
        est = estimate(table, tuned)
        pred.update(public(totals(est)))
        progress(f"re-estimated with {', '.join(work.quant.float_layers)} in float")
    paths = save_artifact(work, strategy, out_dir)
    onnx_check = _export_onnx(work, strategy, out_dir, est, pred, paths, onnx_required, progress) \
        if "onnx" in export else None
    progress(f"saved {paths['model']}; measuring")
    ep = load_program(paths["model"], loaded.trust_pickle)  # measure what was saved, as a user would load it
    meas, notes = measure_work(work, ep, paths["model"])
    if est.unsupported:
        notes.append(f"{len(est.unsupported)} operator(s) the estimators do not know "
                     f"({', '.join(sorted({u['op'] for u in est.unsupported}))}): their parameters count in the "
                     "predicted params and size, their compute and latency are not predicted")
    if onnx_check is not None and "error" in onnx_check:
        notes.append(f"no ONNX export: {onnx_check['error']}")
    elif onnx_check is not None:
        meas["onnx_size_bytes"] = onnx_check["size_bytes"]
    acc.after(ep, pred, meas, progress)
    lat_info, anchor, latency_extra = None, None, {}
    if hardware == "host" and not latency_now:
        # built beside others (maybe in another process, with other threads): this machine's profile and anchor are
        # the measuring process's, so measure_saved_latency predicts the latency where it measures it
        notes.append("latency to be predicted and measured by measure_saved_latency")
    elif hardware:
        lat_info, anchor, latency_extra = _latency(loaded, table, est, ep, work, hardware, batch_size, anchor_on,
                                                   latency_now, runtime, onnx_check, pred, notes, progress)
    result = CandidateResult(
        model=loaded.spec, input_shape=shape_json(loaded.input_shape), batch_size=batch_size,
        strategy=strategy.model_dump(exclude_none=True), compact=strategy.compact(), label=strategy.label(),
        artifact=paths, pred=Prediction(**pred), meas=Measurement(**meas),
        unpruned=est.plan.unpruned if any(s.method in ("prune", "distill") for s in strategy.steps) else [],
        unsupported_ops=est.unsupported, log=work.log, notes=notes,
        pred_before_tuning=Prediction(**pred_before_tuning) if pred_before_tuning is not None else None,
        float_layers=list(work.quant.float_layers) if work.quant is not None else [], data=acc.summary(),
        training=work.training, onnx=onnx_check, **latency_extra)
    return record_latency(result, lat_info, anchor) if lat_info is not None else result


def _checked(loaded: LoadedModel, strategy: Strategy, out_dir: str, hardware: str | None, data_spec: str | None,
             export: tuple[str, ...], runtime: str) -> tuple[str, ...]:
    """Every refusal apply makes before any work; returns the export forms to write."""
    check_executable(strategy, bool(data_spec), {n for n, _ in loaded.model.named_modules()}, loaded.n_inputs)
    from .onnx_runtime import check_runtime

    check_runtime(runtime, hardware)
    export = check_export_forms(export, runtime)
    if "onnx" in export:
        from .onnx_export import onnx_form

        onnx_form(strategy)  # a strategy ONNX cannot express is refused before the work
    if data_spec:
        from estimators.data import check_one_input

        check_one_input(data_spec, loaded)
    check_out_dir(out_dir)
    return export


@dataclass
class _Accuracy:
    """Accuracy with `--data`: measured before, predicted for the strategy, measured on the artifact after (a truth
    the recovery model learns from). Without data every part is None."""

    data: Any = None
    train_cfg: Any = None
    before_pct: float | None = None
    predicted: dict[str, Any] | None = None

    @classmethod
    def before(cls, loaded, table, strategy, data_spec, train_cfg, pred, progress) -> "_Accuracy":
        if not data_spec:
            return cls(train_cfg=train_cfg)
        from estimators.accuracy import predict_drop
        from estimators.data import accuracy, load_data_for

        from .train import TrainConfig

        data = load_data_for(data_spec, loaded)
        train_cfg = train_cfg or TrainConfig()
        before_pct = accuracy(loaded.model, data.val)
        progress(f"{loaded.spec} on {data.spec}: validation accuracy {before_pct:.2f}% ({data.val_size} inputs)")
        predicted = predict_drop(loaded, table, strategy, data, train_cfg.epochs, progress=progress)
        pred["accuracy_drop"] = predicted["accuracy_drop"]
        return cls(data, train_cfg, before_pct, predicted)

    def after(self, ep, pred, meas, progress) -> None:
        if self.data is None:
            return
        meas["accuracy"] = round(artifact_accuracy(ep, self.data), 4)
        meas["accuracy_drop"] = round(self.before_pct - meas["accuracy"], 4)
        progress(f"artifact accuracy {meas['accuracy']:.2f}% (drop {meas['accuracy_drop']:+.2f} points, predicted "
                 f"{pred['accuracy_drop']:+.2f})")
        from estimators.accuracy import record_truth

        record_truth(self.predicted, meas["accuracy_drop"])  # the recovery model learns from this truth

    def summary(self) -> dict[str, Any] | None:
        d = self.data
        if d is None:
            return None
        return {"spec": d.spec, "train_size": d.train_size, "val_size": d.val_size,
                "accuracy_before": round(self.before_pct, 4), "accuracy_estimate": self.predicted,
                "finetune_epochs": self.train_cfg.epochs, "kd_finetune": self.train_cfg.kd_finetune}


def _export_onnx(work, strategy: Strategy, out_dir: str, est, pred: dict[str, Any], paths: dict[str, str],
                 required: bool, progress: Callable[[str], None]) -> dict[str, Any]:
    """model.onnx beside the program, verified, its size predicted by the ONNX layout; a failure is an error when
    `required`, else `{error}`."""
    from estimators.methods.quantize import onnx_layout

    from .onnx_export import export_onnx

    pred["onnx_size_bytes"] = totals(onnx_layout(est))["size_bytes"]
    try:
        check = export_onnx(work, strategy, out_dir, pred["onnx_size_bytes"], progress)
        paths["onnx"] = check["path"]
        return check
    except UserInputError as exc:
        if required:
            raise UserInputError(f"{exc} ({paths['model']} is saved)") from None
        return {"error": str(exc)}


def _latency(loaded, table, est, ep, work, hardware: str, batch_size: int, anchor_on: bool, latency_now: bool,
             runtime: str, onnx_check, pred: dict[str, Any], notes: list[str], progress: Callable[[str], None]):
    """The candidate's predicted latency (into `pred`) and, on this machine, its measurement in alternation with
    the original: (measurement or None, anchor, the result's latency entries)."""
    prof, anchor, extra = predict_host_latency(loaded, table, est, hardware, batch_size, anchor_on, progress, runtime)
    pred["latency_ms"] = extra.pop("latency_ms")
    if extra["hardware"].get("warning"):
        notes.append(extra["hardware"]["warning"])
    from .onnx_runtime import slow_path_note

    from hardware.latency import group_slow_note

    notes.extend(n for n in (slow_path_note(table, est, runtime), group_slow_note(table, est, prof, batch_size)) if n)
    lat_info = None
    if prof.name == "host" and latency_now and runtime == "onnxruntime":
        lat_info = onnx_latency((onnx_check or {}).get("path"), loaded, batch_size, anchor, notes, progress)
    elif prof.name == "host" and latency_now:
        progress(f"measuring latency at batch {batch_size} in alternation with the original")
        int8 = work.quant is not None and work.quant.dtype == "int8"
        lat_info = measure_candidate(fast_form(ep, int8), loaded, batch_size, anchor, int8=int8, progress=progress)
    elif prof.name != "host":
        notes.append(f"latency is predicted for {prof.name}; it can be measured only on that device")
    return lat_info, anchor, extra
