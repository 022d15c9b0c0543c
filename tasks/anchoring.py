"""Measuring the original model on this machine: the anchor every candidate's latency is predicted against
(hardware.anchor), and the interleaved measurement every executed candidate is scored with.

The anchor is measured where the target is this machine: the profile is this machine's host profile
(hardware.hostprofile). A profile of another device, or a host profile calibrated on another machine, cannot be
anchored here: its predictions stay the profile's own (`latency_basis: profile`).
"""
from __future__ import annotations

import math
import socket
from typing import Callable


from estimators.modelspec import LoadedModel
from estimators.table import LayerTable
from hardware.anchor import PROBE_STRATEGY, Anchor, build_anchor, load_anchor, table_fingerprint

Progress = Callable[[str], None]
ANCHOR_TRIES = 3
INT8_UNCERTAINTY = 0.03  # an INT8 ratio less sure than this (relative) is timed again
INT8_PROBE = f"{PROBE_STRATEGY},quantize:int8"  # the INT8 runtime's second point: the probe quantized
INT8_REFERENCES = 4  # compiled INT8 originals kept in a process (the newest), to time INT8 candidates against
_int8_references: dict[tuple[str, int], Callable] = {}


def anchorable(profile) -> bool:
    """Whether `profile` is this machine's (a host profile calibrated here): only then can its target be measured."""
    from hardware.hostprofile import host_key, key_of

    return profile.name == "host" and key_of(profile) == host_key()


def original_program(loaded: LoadedModel):
    """The original model as its float artifact runs (the torch.export program, dynamic batch)."""
    from .executors import export_program

    return export_program(loaded.model, loaded.example_input(2))


def original_int8(loaded: LoadedModel, batch: int):
    """The original quantized exactly as an INT8 candidate is (tasks.executors.run_strategy: a copy of the model,
    static INT8 calibrated as apply calibrates without data) and compiled as INT8 artifacts run: the anchor's
    INT8 level is the same program a `quantize:int8` candidate would be."""
    from estimators.strategy import QuantizeStep, Strategy

    from .apply import fast_form
    from .executors import run_strategy

    return fast_form(run_strategy(loaded, Strategy(steps=[QuantizeStep(dtype="int8")])).program, True)


def int8_work(loaded: LoadedModel, table: LayerTable, text: str):
    """(`loaded` executed by the INT8 strategy `text` and compiled as INT8 artifacts run, its estimated table)."""
    from estimators.compress import estimate
    from estimators.strategy import parse_strategy

    from .apply import fast_form
    from .executors import run_strategy

    strategy = parse_strategy(text)
    return fast_form(run_strategy(loaded, strategy).program, True), estimate(table, strategy)


def keep_int8_reference(fingerprint: str, batch: int, fn: Callable) -> None:
    """Keep the compiled INT8 original of the model `fingerprint` at `batch` for this process (int8_reference)."""
    _int8_references.pop((fingerprint, batch), None)
    _int8_references[(fingerprint, batch)] = fn
    while len(_int8_references) > INT8_REFERENCES:
        _int8_references.pop(next(iter(_int8_references)))


def forget_int8_references() -> None:
    """Drop the compiled INT8 originals this process keeps (with torch._dynamo.reset, after which they would compile
    again)."""
    _int8_references.clear()


def int8_reference(loaded: LoadedModel, anchor: Anchor, progress: Progress = lambda m: None) -> Callable:
    """The original quantized and compiled as the anchor's INT8 point was (original_int8): the one the anchor timed
    where this process measured it, else built again."""
    key = (anchor.fingerprint, anchor.batch)
    if key not in _int8_references:
        progress("quantizing and compiling the original as INT8 artifacts run, to time the INT8 candidate against")
        keep_int8_reference(*key, original_int8(loaded, anchor.batch))
    return _int8_references[key]


def measure_anchor(loaded: LoadedModel, table: LayerTable, profile, batch: int = 1, int8: bool | None = None,
                   progress: Progress = lambda m: None) -> Anchor:
    """Measure the original on this machine: its artifact's latency, every row's time in context, the probe
    (probe_work) and (`int8`; default: where the profile runs INT8 fast) the quantized original compiled, with the
    probe quantized and compiled (INT8_PROBE) as the INT8 runtime's second point (hardware.anchor.Anchor.runtime_line).
    The compiled INT8 original is kept for this process (int8_reference)."""
    from estimators.compress import estimate
    from estimators.strategy import Strategy, QuantizeStep
    from hardware.latency import predict_latency
    from hardware.measure import measure_interleaved
    from hardware.timing import row_shares

    x = loaded.example_input(batch)
    progress(f"anchoring: measuring {loaded.spec} at batch {batch} on this machine (once; cached)")
    fn = original_program(loaded).module()
    runtimes, notes, fns = {}, [], [fn]
    at: dict[str, int] = {}  # where the INT8 original and the probe are in fns
    int8 = "int8" in profile.fast_dtypes if int8 is None else int8
    if int8 and loaded.n_inputs > 1:  # static INT8 is executed for models of one input only (check_executable)
        int8 = False
        notes.append(f"the original takes {loaded.n_inputs} inputs, which static INT8 quantization does not; it "
                     "has no INT8 candidates")
    if int8:
        progress("anchoring: quantizing and compiling the original as INT8 artifacts run")
        try:
            fns.append(original_int8(loaded, batch))
            at["int8"] = len(fns) - 1
        except Exception as exc:  # a model INC cannot quantize: its INT8 candidates keep the profile's prediction
            notes.append(f"the original could not be quantized to INT8 here ({type(exc).__name__}: {str(exc)[:200]}); "
                         "INT8 candidates keep the profile's prediction")
    probe = probe_work(loaded, table, notes, progress)
    if probe is not None:
        fns.append(probe[0].program.module())
        at["probe"] = len(fns) - 1
    int8_probe = None
    if probe is not None and "int8" in at and probe_on_slow_kernels(table, profile, batch):
        notes.append(f"no second INT8 point: {INT8_PROBE} puts grouped convolutions on the slow INT8 kernel the "
                     "profile prices by its own speed; INT8 candidates are predicted by one measured ratio")
    elif probe is not None and "int8" in at:
        progress(f"anchoring: the probe quantized and compiled as INT8 artifacts run ({INT8_PROBE})")
        try:
            int8_probe = int8_work(loaded, table, INT8_PROBE)
            fns.append(int8_probe[0])
            at["int8probe"] = len(fns) - 1
        except Exception as exc:  # noqa: BLE001 - one INT8 point then, said
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            notes.append(f"no second INT8 point: {INT8_PROBE} could not be executed ({type(exc).__name__}: {first}); "
                         "INT8 candidates are predicted by one measured ratio")
    # this machine stalls for seconds at a time: the original is timed in many short rounds, and its rows as
    # shares of it timed in alternation with them (hardware.timing.row_shares), which the drift barely moves; the
    # INT8 original's ratio to it is timed again (up to ANCHOR_TRIES) while it is uncertain, keeping the surest
    best = None
    for _ in range(ANCHOR_TRIES):
        got = measure_interleaved(fns, [x] * len(fns))
        # the INT8 ratio's uncertainty: its rounds' spread over the square root of their number
        unsure = max([got["ratio_iqr"][i] / got["ratio"][i] / got["rounds"] ** 0.5
                      for i in (at.get("int8"), at.get("int8probe")) if i] + [0.0])
        if best is None or unsure < best[0]:
            best = (unsure, got)
        if unsure <= INT8_UNCERTAINTY:
            break
        progress("anchoring: the INT8 original's timing is uncertain (the machine was busy): timing it again")
    unsure, got = best
    if unsure > INT8_UNCERTAINTY:
        notes.append(f"the INT8 original's ratio to the original stayed uncertain (+-{100 * unsure:.0f}%) in "
                     f"{ANCHOR_TRIES} tries (a busy machine)")
    total = got["latency_ms"][0]
    shares = row_shares(loaded.model, x, fn)
    rows = [s * total * 1e-3 for s in shares]
    if "int8" in at:
        q = predict_latency(estimate(table, Strategy(steps=[QuantizeStep(dtype="int8")])), profile, batch)
        runtimes["int8"] = {"measured_ms": total * got["ratio"][at["int8"]], "predicted_ms": q.latency_ms}
        if "int8probe" in at:
            runtimes["int8"].update(probe_measured_ms=total * got["ratio"][at["int8probe"]],
                                    probe_predicted_ms=predict_latency(int8_probe[1], profile, batch).latency_ms)
        slow_ns = group_slow_now(table, profile, batch, progress)
        if slow_ns:
            runtimes["int8"]["group_slow_ns"] = slow_ns
        keep_int8_reference(table_fingerprint(table), batch, fns[at["int8"]])
    point = None
    if probe is not None:
        p_total = total * got["ratio"][at["probe"]]
        p_shares = row_shares(probe[0].model, x, fns[at["probe"]])
        if len(p_shares) == len(shares):
            point = (probe[1], [s * p_total * 1e-3 for s in p_shares], p_total)
        else:  # the pruned model ran other operators than the original's rows: one point only
            notes.append(f"the probe ({PROBE_STRATEGY}) was not used: it timed {len(p_shares)} operators, the "
                         f"original {len(shares)}")
    anchor = build_anchor(table, profile, batch, rows, total, socket.gethostname(), runtimes, notes, point)
    progress(f"anchoring: {loaded.spec} runs {total:.3f} ms here (the profile predicted {sum(anchor.predicted_rows_ms) + anchor.predicted_outside_ms:.3f} ms)"
             + (f"; INT8 {runtimes['int8']['measured_ms']:.3f} ms (predicted {runtimes['int8']['predicted_ms']:.3f})"
                if "int8" in runtimes else "")
             + (f"; INT8 pruned by half {runtimes['int8']['probe_measured_ms']:.3f} ms (predicted "
                f"{runtimes['int8']['probe_predicted_ms']:.3f})" if "probe_measured_ms" in runtimes.get("int8", {})
                else "")
             + (f"; pruned by half {anchor.probe['total_ms']:.3f} ms (predicted "
                f"{sum(anchor.probe['predicted_rows_ms']) + anchor.probe['predicted_outside_ms']:.3f})"
                if anchor.probe else ""))
    return anchor


def probe_on_slow_kernels(table: LayerTable, profile, batch: int) -> bool:
    """Whether the INT8 probe (INT8_PROBE) has grouped convolutions the profile prices on their slow kernel: a line
    through it would carry that kernel's time into every INT8 candidate's fast rows."""
    from estimators.compress import estimate
    from estimators.strategy import parse_strategy
    from hardware.latency import group_slow_rows

    return group_slow_rows(estimate(table, parse_strategy(INT8_PROBE)), profile, batch)[0] > 0


def group_slow_now(table: LayerTable, profile, batch: int, progress: Progress = lambda m: None) -> float | None:
    """Where the profile prices some of `table`'s grouped convolutions' INT8 kernels by a slow kernel's speed (its
    group rule, hardware.calibrate.int8.group_rule), that slow kernel's nanoseconds per FLOP timed now, with the
    anchor, in a compiled graph (int8_group_graph_ns): timed alone it ran 0.86 ns per FLOP in one calibration of
    this AMD EPYC and 1.2-1.6 an hour later, a drift the original's fast kernels (the anchor's INT8 ratio) do not
    show. None where the rule is not the profile's, or the table has no grouped convolution, or the kernels timed
    now fit no rule."""
    from hardware.calibrate.int8 import group_rule, int8_group_graph_ns, int8_group_samples
    from hardware.latency import latency_kinds

    from .quantize_exec import compiled_int8

    eff = profile.eff("int8", batch) if "int8" in profile.peak_gflops else None
    if eff is None or not eff.group_multiple or table.groups is None or not (latency_kinds(table) == "gconv").any():
        return None
    multiple, _ = group_rule(int8_group_samples(progress))
    if multiple != eff.group_multiple:
        return None
    return round(int8_group_graph_ns(compiled_int8, multiple, progress), 4) or None


def probe_work(loaded: LoadedModel, table: LayerTable, notes: list[str], progress: Progress,
               text: str = PROBE_STRATEGY):
    """The original pruned by `text` (default hardware.anchor.PROBE_STRATEGY; executed and exported as a candidate
    is) and its estimated table: the anchor's second point. None, with a note, where the original cannot be pruned
    so."""
    from estimators.compress import estimate
    from estimators.strategy import parse_strategy

    from .executors import run_strategy

    strategy = parse_strategy(text)
    progress(f"anchoring: a second point, the original pruned by half ({text})")
    try:
        est = estimate(table, strategy)
        if est.n != table.n or list(est.names) != list(table.names):
            raise RuntimeError("its analysis has other rows than the original's")
        return run_strategy(loaded, strategy), est
    except Exception as exc:  # noqa: BLE001 - a model torch-pruning cannot prune: one point, said
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        notes.append(f"no second point: the original could not be pruned by half ({type(exc).__name__}: {first}); "
                     "candidates are predicted by one measured ratio per row")
        return None


def get_anchor(loaded: LoadedModel, table: LayerTable, profile, batch: int = 1, progress: Progress = lambda m: None,
               measure: bool = True) -> Anchor | None:
    """The anchor of `loaded` on `profile` at `batch`: cached, or measured now (`measure`) where the profile is this
    machine's; None where the target cannot be measured here."""
    if not anchorable(profile):
        return None
    from hardware.anchor import anchor_path, table_fingerprint
    from hardware.hostprofile import profile_hash

    got = load_anchor(table, profile, batch)
    if got is not None or not measure:
        return got
    anchor = measure_anchor(loaded, table, profile, batch, progress=progress)
    anchor.save(anchor_path(table_fingerprint(table), profile_hash(profile), batch))
    return anchor


def measure_against_original(candidate: Callable, loaded: LoadedModel, batch: int, rounds: int | None = None,
                             original: Callable | None = None, original_after: Callable | None = None
                             ) -> dict[str, float]:
    """The candidate timed in alternation with the original (round by round, hardware.measure.measure_interleaved):
    `ratio` is the candidate's latency over the original's, which this machine's drift barely moves;
    `latency_ms` and `original_ms` the two medians of this window. `original_after`: a second instance of the
    original, made after the candidate's (an ONNX Runtime session): the ratio is then the candidate's over the
    geometric mean of the two, since of two sessions of one ONNX model the one made first ran 1-2% apart from the
    other in a process that had exported models before, and the candidate's is always made between them."""
    from hardware.measure import measure_interleaved

    x = loaded.example_input(batch)
    orig = original if original is not None else original_program(loaded).module()
    fns = [orig, candidate] + ([original_after] if original_after is not None else [])
    got = measure_interleaved(fns, [x] * len(fns), rounds=rounds)
    ratio = got["ratio"][1] / (math.sqrt(got["ratio"][2]) if original_after is not None else 1.0)
    return {"ratio": ratio, "ratio_iqr": got["ratio_iqr"][1], "latency_ms": got["latency_ms"][1],
            "original_ms": got["latency_ms"][0], "rounds": got["rounds"]}


def latency_context(loaded: LoadedModel, table: LayerTable, hardware: str, batch: int = 1, anchor: bool = True,
                    progress: Progress = lambda m: None, measure: bool = True, runtime: str = "pytorch") -> tuple:
    """What a command needs to predict `loaded`'s latency on `hardware`: (the profile, its anchor or None, what
    the output records of both). `host` is this machine (calibrated first where it has no profile); the anchor is
    measured where the profile is this machine's and `anchor` is on (`measure=False`: only a cached one is used, as
    in a process building candidates in parallel with others, where nothing may be timed). `runtime`
    `onnxruntime`: the latency of the candidates' ONNX exports in ONNX Runtime here (tasks.onnx_runtime)."""
    from hardware.hostprofile import identity

    from .onnx_runtime import runtime_profile

    prof = runtime_profile(hardware, runtime, progress)
    info = {"name": prof.name, "runtime": prof.runtime, "batch_size": batch, "profile": identity(prof)}
    if info["profile"]["warning"]:
        info["warning"] = info["profile"]["warning"]
    get = get_anchor
    if runtime == "onnxruntime":
        from .onnx_runtime import get_ort_anchor as get

        info["runtime"] = "onnxruntime"
    got = get(loaded, table, prof, batch, progress=progress, measure=measure) if anchor else None
    if got is not None:
        info["anchor"] = got.summary()
    elif anchor and not anchorable(prof):
        info["anchor"] = None
        info["anchor_note"] = (f"latency predicted by the {prof.name} profile alone (latency_basis: profile): "
                               "its target cannot be measured from here")
    else:
        info["anchor"] = None
        info["anchor_note"] = "anchoring off (--no-anchor): latency predicted by the profile alone"
    return prof, got, info
