"""apply: execute a strategy, save the artifact, measure it and compare with the prediction."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable


from estimators.analyze import analyze
from estimators.compress import estimate
from estimators.modelspec import LoadedModel
from estimators.report import public, rel_err
from estimators.strategy import Strategy
from estimators.table import totals
from hardware.measure import (PaceReference, at_pace, count_module, gemm_macs, measure_memory_access_bytes,
                              measure_paced, measure_peak_activation_bytes, stored_tensor_bytes, stored_tensors,
                              sync_probe_us)

from .executors import Work, run_strategy, save_artifact
from .quantize_exec import load_program


def measure_work(work: Work, ep, artifact_path: str) -> tuple[dict[str, Any], list[str]]:
    """Measure the real artifact `ep` (loaded back from `artifact_path`) and the compressed module it was made from."""
    notes: list[str] = []
    ex = work.example(work.loaded.input_shape[0])
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


@functools.cache
def pace_reference() -> PaceReference:
    """This process's pace network (hardware.measure.PaceReference; built at the first call)."""
    return PaceReference()


def fast_latency(ep, int8: bool, example) -> dict[str, Any]:
    """Latency of a saved program in the form that runs it fast: eager for float programs,
    inductor-compiled (freezing) for int8 ones; timed in alternation with the pace network (`pace_ms`:
    hardware.measure.measure_paced), with the machine's sync probe read just before
    (hardware.measure.sync_probe_us)."""
    if int8:
        from .quantize_exec import compile_for_inference

        fn = compile_for_inference(ep)
    else:
        fn = ep.module()
    probe = sync_probe_us()  # the machine's state just before: a slow spell shows beside the figure it slowed
    got = measure_paced(fn, example, pace_reference(), warmup=3, min_runs=10, budget_s=3.0)
    return {**got, "pace_ms": round(got["pace_ms"], 4), "sync_probe_us": round(probe, 3)}


def paced_latency(meas: dict[str, Any], lat: dict[str, Any], prof) -> None:
    """Record in `meas` the measured latency at the host profile `prof`'s pace (`latency_at_pace_ms`: as if the
    machine ran as fast as when it was calibrated; hardware.measure.at_pace), where the profile and the
    measurement both read the pace network. rel_err compares the prediction with it (`err.latency_at_pace_ms`)."""
    pace = prof.calibrated_pace() or 0.0
    paced = at_pace(lat["latency_ms"], lat.get("pace_ms", 0.0), pace, prof.pace_elasticity())
    if paced is not None:
        meas["latency_at_pace_ms"] = round(paced, 4)
        lat["profile_pace_ms"] = pace
        lat["profile_pace_elasticity"] = prof.pace_elasticity()


def measure_artifact_latency(work: Work, ep, batch_size: int) -> dict[str, Any]:
    """Latency of the saved artifact `ep` on this machine (fast_latency)."""
    return fast_latency(ep, work.quant is not None and work.quant.dtype == "int8", work.example(batch_size))


def saved_latency(model_path: str, strategy: dict[str, Any], input_shape: list[int], batch_size: int) -> dict[str, Any]:
    """Latency of a saved artifact, loaded from `model_path`, on the seeded example input at `batch_size`
    (fast_latency: compiled when the strategy is int8)."""
    import torch

    from estimators.modelspec import SEED

    ep = load_program(model_path)
    int8 = any(s.get("method") == "quantize" and s.get("dtype") == "int8" for s in strategy["steps"])
    shape = [batch_size, *input_shape[1:]]
    return fast_latency(ep, int8, torch.randn(*shape, generator=torch.Generator().manual_seed(SEED)))


def state_notes(lat: dict[str, Any], prof) -> list[str]:
    """A note when the profile `prof` (a HardwareProfile) was calibrated on another CPU (hardware.measure.
    machine_note). Else record in `lat` the machine state it was calibrated in (`profile_sync_probe_us`) and
    whether the measurement was taken in it (`state_matches_profile`); a note when it was not."""
    from hardware.measure import machine_note, same_state

    other_cpu = machine_note(prof)
    if other_cpu:
        return [other_cpu]
    ref = prof.calibrated_state()
    if not ref or "sync_probe_us" not in lat:
        return []
    lat["profile_sync_probe_us"] = ref
    lat["state_matches_profile"] = same_state(lat["sync_probe_us"], ref)
    if lat["state_matches_profile"]:
        return []
    return [f"latency measured in another state of this machine than the {prof.name} profile was calibrated in "
            f"(sync probe {lat['sync_probe_us']:.2f} us against {ref:.2f} us): its error includes the machine's change"]


def measure_saved_latency(result: dict[str, Any], prof=None) -> dict[str, Any]:
    """Measure the latency of an artifact `apply_and_measure(..., latency_now=False)` saved, in the form
    that runs it fast, and complete its `meas` and `err` (the result is returned updated). `prof`: the host
    profile it was predicted with (loaded here when not given), for state_notes."""
    from hardware.profile import load_profile

    lat = saved_latency(result["artifact"]["model"], result["strategy"], result["input_shape"], result["batch_size"])
    prof = prof if prof is not None else load_profile("host")
    out = dict(result)
    out["meas"] = {**result["meas"], "latency_ms": round(lat["latency_ms"], 4)}
    paced_latency(out["meas"], lat, prof)
    out["err"] = rel_err(result["pred"], out["meas"])
    out["notes"] = [n for n in result.get("notes", []) if not n.startswith("latency to be measured")] \
        + state_notes(lat, prof)
    out["latency_measurement"] = lat
    return out


def artifact_accuracy(ep, data) -> float:
    """Top-1 accuracy of a saved artifact on the validation data, run as the program it is."""
    from estimators.data import accuracy

    return accuracy(ep.module(), data.val, set_eval=False)


def apply_and_measure(loaded: LoadedModel, strategy: Strategy, out_dir: str, hardware: str | None = None,
                      batch_size: int = 1, progress: Callable[[str], None] = lambda m: None, data_spec: str | None = None,
                      train_cfg: Any = None, latency_now: bool = True) -> dict[str, Any]:
    """`latency_now=False`: predict the latency but leave measuring it to `measure_saved_latency` (a
    pipeline that builds candidates in parallel measures them one at a time afterwards)."""
    progress(f"analysing {loaded.spec}")
    table = analyze(loaded)
    est = estimate(table, strategy)
    pred = public(totals(est))
    data = None
    acc_before = None
    if data_spec:
        from estimators.data import accuracy, load_data_for

        from .train import TrainConfig

        data = load_data_for(data_spec, loaded)
        train_cfg = train_cfg or TrainConfig()
        acc_before = accuracy(loaded.model, data.val)
        progress(f"{loaded.spec} on {data.spec}: validation accuracy {acc_before:.2f}% ({data.val_size} inputs)")
        from estimators.accuracy import predict_drop

        acc_pred = predict_drop(loaded, table, strategy, data, train_cfg.epochs, progress=progress)
        pred["accuracy_drop"] = acc_pred["accuracy_drop"]
    progress(f"executing {strategy.compact()}")
    work = run_strategy(loaded, strategy, data=data, train_cfg=train_cfg, progress=progress)
    pred_before_tuning = None
    qstep = next((s for s in strategy.steps if s.method == "quantize"), None)
    if qstep is not None and qstep.dtype == "int8" and work.quant is not None \
            and set(work.quant.float_layers) != set(qstep.keep_float):
        # layers the quantizer (autotune) left in float: the prediction follows what was really built
        tuned = strategy.model_copy(update={"steps": [s.model_copy(update={"keep_float": list(work.quant.float_layers)})
                                                      if s is qstep else s for s in strategy.steps]})
        pred_before_tuning = dict(pred)
        est = estimate(table, tuned)
        pred.update(public(totals(est)))
        progress(f"re-estimated with {', '.join(work.quant.float_layers)} in float")
    paths = save_artifact(work, strategy, out_dir)
    progress(f"saved {paths['model']}; measuring")
    ep = load_program(paths["model"])  # measure what was saved, as a user would load it
    meas, notes = measure_work(work, ep, paths["model"])
    if data is not None:
        meas["accuracy"] = round(artifact_accuracy(ep, data), 4)
        meas["accuracy_drop"] = round(acc_before - meas["accuracy"], 4)
        progress(f"artifact accuracy {meas['accuracy']:.2f}% (drop {meas['accuracy_drop']:+.2f} points, predicted "
                 f"{pred['accuracy_drop']:+.2f})")
        from estimators.accuracy import record_truth

        record_truth(acc_pred, meas["accuracy_drop"])  # the recovery model learns from this truth
    lat_info = None
    if hardware:
        from hardware.latency import predict_latency
        from hardware.profile import load_profile

        prof = load_profile(hardware)
        pred["latency_ms"] = round(predict_latency(est, prof, batch_size).latency_ms, 4)
        if prof.name == "host" and latency_now:
            progress(f"measuring latency at batch {batch_size}")
            lat = measure_artifact_latency(work, ep, batch_size)
            meas["latency_ms"] = round(lat["latency_ms"], 4)
            paced_latency(meas, lat, prof)
            notes.extend(state_notes(lat, prof))
            lat_info = lat
        elif prof.name == "host":
            notes.append("latency to be measured by measure_saved_latency")
        else:
            notes.append(f"latency is predicted for {prof.name}; it can be measured only on that device")
    return {
        "latency_measurement": lat_info,
        "model": loaded.spec,
        "input_shape": list(loaded.input_shape),
        "batch_size": batch_size,
        "strategy": strategy.model_dump(exclude_none=True),
        "compact": strategy.compact(),
        "artifact": paths,
        "pred": pred,
        "meas": meas,
        "err": rel_err(pred, meas),
        "unpruned": est.plan.unpruned if any(s.method in ("prune", "distill") for s in strategy.steps) else [],
        "log": work.log,
        "notes": notes,
        "pred_before_tuning": pred_before_tuning,
        "float_layers": list(work.quant.float_layers) if work.quant is not None else [],
        "data": None if data is None else {"spec": data.spec, "train_size": data.train_size, "val_size": data.val_size,
                                           "accuracy_before": round(acc_before, 4), "accuracy_estimate": acc_pred,
                                           "finetune_epochs": train_cfg.epochs, "kd_finetune": train_cfg.kd_finetune},
        "training": work.training,
    }
