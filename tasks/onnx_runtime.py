"""ONNX Runtime as the runtime a model is deployed in on this machine: the anchor and the measurement.

A candidate's ONNX Runtime latency is predicted anchored on the original model measured in ONNX Runtime here:
the original exported as deployfit exports candidates (tasks.onnx_export: the float ONNX, and the original
quantized to a QDQ model exactly as a `quantize:int8` candidate is), both timed in alternation in sessions set up
as a deployment runs them (tasks.onnx_export.session). This machine's ONNX Runtime profile (load_ort_profile:
the host profile's machine with efficiencies fitted to synthetic networks timed whole in ONNX Runtime,
hardware.calibrate.onnxrt) prices each candidate relative to the original (how pruning, distillation and
quantization change its rows), and alone where anchoring is off; the anchor sets the level ONNX Runtime runs the
original at, float and INT8 (hardware.anchor: the rows are the profile's, brought to the measured total, since
ONNX Runtime fuses operators that the table keeps apart). A candidate is measured as its
`model.onnx` in a session, in alternation with the original's, and its latency is the ratio of the two times the
anchor's total: the protocol PyTorch candidates are measured with.
"""
from __future__ import annotations

import functools
import socket
from pathlib import Path
from typing import Callable

import numpy as np

from estimators.errors import UserInputError
from estimators.modelspec import LoadedModel
from estimators.table import LayerTable

from hardware.calibrate.onnxrt import ORT_CHANNEL_MULTIPLE

RUNTIMES = ("pytorch", "onnxruntime")
Progress = Callable[[str], None]
# ONNX Runtime runs a convolution in its fast blocked layout (NCHWc) only where its input channels are a multiple of
# this (docs/onnx.md): pruning to other counts left resnet18 at prune:0.3 no faster than the original there, so a
# plan for ONNX Runtime keeps every pruned channel count a multiple of it
NCHWC_CHANNELS = ORT_CHANNEL_MULTIPLE
# the version of the layout rules an ONNX Runtime profile is fitted under (its file name carries it): a profile
# fitted under older rules is fitted again
ORT_PROFILE_RULES = 2


def in_blocked_layout(path: str | Path, optimised: str | Path) -> bool:
    """Whether ONNX Runtime's graph optimiser here puts any operator of the ONNX model at `path` in its blocked
    layout (NCHWc); the optimised graph is written to `optimised`."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(optimised)
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return any("nchwc" in n.domain for n in onnx.load(str(optimised)).graph.node)


@functools.lru_cache(maxsize=1)
def nchwc_block() -> int | None:
    """ONNX Runtime's NCHWc block on this CPU (its MLAS library: 8 channels with AVX2, 16 with AVX-512), read from
    what its graph optimiser makes of a grouped 1x1 convolution of 8, 16 and 32 channels per group: the fewest it
    puts in the blocked layout (a grouped convolution goes there only with channels per group a multiple of the
    block). None where it puts none there: no blocked layout on this CPU."""
    import tempfile

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    with tempfile.TemporaryDirectory() as tmp:
        for per_group in (8, 16, 32):
            c = 2 * per_group
            w = numpy_helper.from_array(np.ones((c, per_group, 1, 1), dtype=np.float32), "w")
            graph = helper.make_graph(
                [helper.make_node("Conv", ["x", "w"], ["y"], group=2)], "probe",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 4, 4])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 4, 4])], [w])
            src, opt = Path(tmp) / f"g{per_group}.onnx", Path(tmp) / f"g{per_group}-opt.onnx"
            onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(src))
            if in_blocked_layout(src, opt):
                return per_group
    return None


def plan_round_to(runtime: str) -> int | None:
    """The channel multiple every pruning candidate keeps in a plan for `runtime` (None: any count)."""
    return NCHWC_CHANNELS if runtime == "onnxruntime" else None


def slow_path_convolutions(table: LayerTable) -> int:
    """How many convolutions of `table` (an analysis or an estimate) ONNX Runtime leaves out of its blocked layout
    here, by the rules its profile prices (hardware.calibrate.onnxrt.layout_rules for this CPU's nchwc_block):
    input channels not a multiple of NCHWC_CHANNELS, unless a dense one on fewer than the block; a grouped one,
    channels per group not multiples of the block."""
    from estimators.table import evaluate
    from hardware.calibrate.onnxrt import layout_rules
    from hardware.latency import channels_off, latency_kinds

    kinds = latency_kinds(table)
    ev = evaluate(table)
    slow = channels_off(kinds, ev.cin, ev.cout, groups=table.groups, **layout_rules(nchwc_block()))
    return int((np.isin(kinds, ("conv", "gconv", "dwconv")) & slow).sum())


def slow_path_note(table: LayerTable, candidate: LayerTable, runtime: str = "onnxruntime") -> str | None:
    """A note where `candidate` (an estimate of the original `table`) puts more convolutions on ONNX Runtime's slow
    path than the original has: they can make it run no faster than its original (docs/onnx.md). None for another
    `runtime`."""
    if runtime != "onnxruntime":
        return None
    extra = slow_path_convolutions(candidate) - slow_path_convolutions(table)
    if extra <= 0:
        return None
    return (f"{extra} more convolution(s) than the original fall outside ONNX Runtime's fast blocked layout here "
            f"(input channels not a multiple of {NCHWC_CHANNELS}, or a grouped one's channels per group not a "
            f"multiple of {nchwc_block()}): the ONNX Runtime profile prices that path at one factor per FLOP fitted "
            "on synthetic networks, and such a candidate can run no faster than its original there (docs/onnx.md); "
            f"`:round_to={NCHWC_CHANNELS}` on the prune step keeps dense and depthwise convolutions in it")


def check_runtime(runtime: str, hardware: str | None) -> None:
    if runtime not in RUNTIMES:
        raise UserInputError(f"unknown runtime {runtime!r}: choose from {', '.join(RUNTIMES)}")
    if runtime == "onnxruntime" and hardware not in (None, "host"):
        raise UserInputError("--runtime onnxruntime predicts and measures on this machine: use --hardware host "
                             f"(for {hardware}, export ONNX with --export onnx and build it there)")


def _version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def runtime_text() -> str:
    """What an ONNX Runtime profile predicts for: the runtime as deployfit's sessions run it here."""
    import torch

    return (f"ONNX Runtime {_version()} (CPU execution provider, {torch.get_num_threads()} intra-op threads, every "
            "graph optimisation): float and INT8 QDQ ONNX models as deployfit exports them")


def ort_profile_path(host: Path | None = None) -> Path:
    """Where this machine's ONNX Runtime profile is kept: beside its host profile (`host`, default this machine's),
    keyed by the same machine, by ONNX Runtime's version and by the layout rules it is fitted under."""
    from hardware.hostprofile import host_profile_path

    host = host or host_profile_path()
    return host.with_name(f"{host.stem}-onnxruntime-{_version().replace('.', '_')}-r{ORT_PROFILE_RULES}.yaml")


def calibration_sessions(model, example, folder: Path, int8_layers: list[str]) -> tuple[Callable, Callable | None]:
    """hardware.calibrate.onnxrt's OrtBuilder: `model` exported to ONNX as a candidate is (float, and INT8 QDQ of
    `int8_layers` calibrated on random batches), each as a session function."""
    import torch

    from .executors import export_program
    from .onnx_export import export_float_onnx, quantize_onnx, session, session_fn

    folder.mkdir(parents=True, exist_ok=True)
    float_path = folder / "float.onnx"
    export_float_onnx(export_program(model, example), example, float_path)
    int8_fn = None
    if int8_layers:
        quantize_onnx(float_path, folder / "int8.onnx", [torch.randn_like(example) for _ in range(4)], int8_layers)
        int8_fn = session_fn(session(folder / "int8.onnx"))
    return session_fn(session(float_path)), int8_fn


def calibrate_ort(quick: bool = False, progress: Progress = lambda m: None, int8: bool = True,
                  budget_s: float | None = None, least: int | None = None):
    """This machine's ONNX Runtime profile, fitted now on top of its host profile (calibrated first where it has
    none): hardware.calibrate.onnxrt.calibrate_runtime with this layer's export."""
    from hardware.calibrate.onnxrt import LEAST_NETS, calibrate_runtime
    from hardware.profile import load_profile

    base = load_profile("host", progress=progress)
    return calibrate_runtime(base, calibration_sessions, runtime_text(), nchwc_block(), quick=quick,
                             progress=progress, int8=int8, budget_s=budget_s, least=least or LEAST_NETS)


def load_ort_profile(progress: Progress | None = None, calibrate: bool = True):
    """This machine's ONNX Runtime profile from the cache; where there is none, calibrate it now (quick), with
    progress, and keep it (as `host` is: hardware.hostprofile.load_calibrated). `calibrate=False`: raise instead."""
    from estimators.defaults import QUICK_ORT_CALIBRATION_S
    from hardware.hostprofile import load_calibrated

    return load_calibrated(ort_profile_path(), f"ONNX Runtime {_version()} profile",
                           "deployfit calibrate --runtime onnxruntime", QUICK_ORT_CALIBRATION_S,
                           lambda say: calibrate_ort(quick=True, progress=say), progress, calibrate)


def runtime_profile(hardware: str, runtime: str, progress: Progress | None = None):
    """The profile a prediction for `runtime` on `hardware` uses: this machine's ONNX Runtime profile for
    `onnxruntime` (calibrated first where it has none), else hardware.profile.load_profile's."""
    from hardware.profile import load_profile

    check_runtime(runtime, hardware)
    return load_ort_profile(progress) if runtime == "onnxruntime" else load_profile(hardware, progress=progress)


def runtime_hash(profile_hash: str) -> str:
    """The anchor cache's key for ONNX Runtime on a profile: its anchors are kept apart from PyTorch's (`2`: with
    the probe; an anchor measured before it had one point and is measured again)."""
    return f"{profile_hash}-onnxruntime2-{_version().replace('.', '_')}"


def original_onnx(loaded: LoadedModel, folder: Path, int8: bool) -> tuple[Path, Path | None, list[str]]:
    """The original as ONNX in `folder`: float, and (`int8`) quantized as a `quantize:int8` candidate is."""
    from estimators.strategy import QuantizeStep, Strategy

    from .executors import export_program, run_strategy
    from .onnx_export import export_float_onnx, quantize_onnx

    folder.mkdir(parents=True, exist_ok=True)
    float_path = folder / "original.onnx"
    export_float_onnx(export_program(loaded.model, loaded.example_input(2)), loaded.example_input(2), float_path)
    notes: list[str] = []
    int8_path = None
    if int8 and loaded.n_inputs == 1:
        try:
            work = run_strategy(loaded, Strategy(steps=[QuantizeStep(dtype="int8")]), export=False)
            int8_path = folder / "original-int8.onnx"
            quantize_onnx(float_path, int8_path, work.calibration, work.quant.quantized_layers)
        except Exception as exc:  # INT8 candidates then keep the profile's level
            notes.append(f"the original could not be quantized to an INT8 ONNX model here ({type(exc).__name__}: "
                         f"{str(exc)[:200]}); INT8 candidates keep the profile's prediction")
            int8_path = None
    return float_path, int8_path, notes


def probe_strategy() -> str:
    """The anchor's second point in ONNX Runtime: hardware.anchor.PROBE_STRATEGY kept in the fast layout, as every
    candidate of a plan for ONNX Runtime is (plan_round_to)."""
    from hardware.anchor import PROBE_STRATEGY

    return f"{PROBE_STRATEGY}:round_to={NCHWC_CHANNELS}"


def _rows_at(table: LayerTable, profile, batch: int, total_ms: float) -> tuple[list[float], float]:
    """The profile's rows of `table` (seconds, operator rows in order) brought to `total_ms`, all of it: ONNX
    Runtime fuses operators the analysis keeps apart and is timed as a whole, so its time has no part outside the
    rows and no split between them but the profile's. Returns (the rows, the profile's predicted ms)."""
    from hardware.latency import predict_latency

    pred = predict_latency(table, profile, batch)
    ops = [i for i, k in enumerate(table.kinds) if k != "param"]
    in_rows = float(sum(pred.per_row_ms[i] for i in ops))
    scale = total_ms / in_rows if in_rows > 0 else 0.0
    return [pred.per_row_ms[i] * scale * 1e-3 for i in ops], pred.latency_ms


def measure_ort_anchor(loaded: LoadedModel, table: LayerTable, profile, batch: int, folder: Path,
                       progress: Progress = lambda m: None):
    """The original measured in ONNX Runtime on this machine (module docstring); its ONNX files stay in `folder`
    (the candidates' measurements time against the float one). Where the original can be pruned, the probe
    (probe_strategy) is exported and timed with it: the anchor's two points put the candidates on the line their
    measured totals draw against the profile's predictions (one line for all rows, its intercept the time outside
    them: hardware.anchor.build_anchor's `totals_only`), where one ratio would carry the profile's idea of how
    pruning shrinks a model into ONNX Runtime, whose time follows the compute more closely than eager PyTorch's."""
    from estimators.compress import estimate
    from estimators.strategy import QuantizeStep, Strategy
    from hardware.anchor import build_anchor
    from hardware.latency import predict_latency
    from hardware.measure import measure_interleaved

    from .anchoring import probe_work
    from .onnx_export import export_float_onnx, session, session_fn

    progress(f"anchoring in ONNX Runtime {_version()}: exporting {loaded.spec} (float and INT8)")
    float_path, int8_path, notes = original_onnx(loaded, folder, "int8" in profile.fast_dtypes)
    fns = [session_fn(session(float_path))] + ([session_fn(session(int8_path))] if int8_path else [])
    probe = probe_work(loaded, table, notes, progress, probe_strategy())
    if probe is not None:
        try:
            export_float_onnx(probe[0].program, loaded.example_input(2), folder / "probe.onnx")
            fns.append(session_fn(session(folder / "probe.onnx")))
        except Exception as exc:  # noqa: BLE001 - the probe does not export: one point, said
            notes.append(f"no second point: the original pruned by half did not export to ONNX ({type(exc).__name__}: "
                         f"{str(exc)[:200]})")
            probe = None
    progress(f"anchoring in ONNX Runtime: timing the original at batch {batch}")
    x = loaded.example_input(batch)
    got = measure_interleaved(fns, [x] * len(fns))
    total = got["latency_ms"][0]
    rows, predicted_ms = _rows_at(table, profile, batch, total)
    runtimes = {}
    if int8_path:
        q = predict_latency(estimate(table, Strategy(steps=[QuantizeStep(dtype="int8")])), profile, batch)
        runtimes["int8"] = {"measured_ms": total * got["ratio"][1], "predicted_ms": q.latency_ms}
    notes.append("ONNX Runtime fuses operators the analysis keeps apart: its rows are the profile's, brought to "
                 "the measured total")
    point = None
    if probe is not None:
        p_total = total * got["ratio"][-1]
        point = (probe[1], _rows_at(probe[1], profile, batch, p_total)[0], p_total)
    anchor = build_anchor(table, profile, batch, rows, total, f"{socket.gethostname()} (ONNX Runtime {_version()})",
                          runtimes, notes, point, probe_strategy(), totals_only=True)
    progress(f"anchoring in ONNX Runtime: {loaded.spec} runs {total:.3f} ms (the profile predicted "
             f"{predicted_ms:.3f} ms)"
             + (f"; INT8 {runtimes['int8']['measured_ms']:.3f} ms" if runtimes else "")
             + (f"; pruned by half {point[2]:.3f} ms" if point else ""))
    return anchor


def anchor_folder(table: LayerTable, profile, batch: int) -> Path:
    from hardware.anchor import anchor_path, table_fingerprint
    from hardware.hostprofile import profile_hash

    return anchor_path(table_fingerprint(table), runtime_hash(profile_hash(profile)), batch).with_suffix("")


def get_ort_anchor(loaded: LoadedModel, table: LayerTable, profile, batch: int = 1,
                   progress: Progress = lambda m: None, measure: bool = True):
    """The ONNX Runtime anchor of `loaded` on this machine's `profile` at `batch`: cached (with the original's ONNX
    files), or measured now (`measure`); None where the profile is not this machine's."""
    from hardware.anchor import read_anchor

    from .anchoring import anchorable

    if not anchorable(profile):
        return None
    folder = anchor_folder(table, profile, batch)
    path = folder.with_suffix(".json")
    got = read_anchor(path) if (folder / "original.onnx").is_file() else None
    if got is not None or not measure:
        return got
    anchor = measure_ort_anchor(loaded, table, profile, batch, folder, progress)
    anchor.save(path)
    return anchor


def original_session_fn(anchor) -> Callable:
    """The original's float ONNX (kept beside the anchor) as a session function, to time candidates against."""
    from .onnx_export import session, session_fn

    return session_fn(session(Path(anchor.path).with_suffix("") / "original.onnx"))


def measure_onnx_candidate(onnx_path: str | Path, loaded: LoadedModel, batch: int, anchor) -> dict:
    """A candidate's model.onnx timed in a session in alternation with the original's, as PyTorch candidates are
    (tasks.apply.measure_candidate): its latency is the ratio times the anchor's total. The original has two
    sessions, made before and after the candidate's (tasks.anchoring.measure_against_original)."""
    from .apply import measure_candidate
    from .onnx_export import session, session_fn

    before = original_session_fn(anchor)
    candidate = session_fn(session(onnx_path))
    got = measure_candidate(candidate, loaded, batch, anchor, before, original_session_fn(anchor))
    return {**got, "runtime": f"onnxruntime {_version()}"}
