"""Calibration on a tiny budget writes a profile that loads and predicts; hardware commands."""
import dataclasses
import json

import numpy as np
import pytest

from typer.testing import CliRunner

from estimators.analyze import analyze
from estimators.modelspec import load_model
from flows.cli import app
from hardware.calibrate import calibrate_host, collect_samples, fit_profile, load_samples, merge_samples
from hardware.calibrate.samples import QUICK_LEAST, SEED_STRIDE, at_one_pace, pace_elasticity
from hardware.calibrate.sampling import channel_multiple
from hardware.latency import predict_latency
from hardware.hostprofile import foreign_note, host_key, host_profile_path, key_of
from hardware.measure import cpu_isa
from hardware.profile import load_profile, save_profile

pytestmark = pytest.mark.slow


@dataclasses.dataclass
class Quick:
    """One quick calibration (float only, 6 s of timing), shared by the tests that read it: its progress
    messages, the profile as saved and loaded again, its kept samples, the demo table and two predictions."""

    messages: list
    profile: object
    kept: object
    table: object
    p1: float
    p8: float

    @property
    def fit(self) -> dict:
        return self.profile.provenance.fit


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> Quick:
    folder = tmp_path_factory.mktemp("quick")
    messages = []
    prof = calibrate_host(quick=True, int8=False, budget_s=6.0, progress=messages.append, keep=folder / "s.npz")
    save_profile(prof, folder / "host.yaml")
    again = load_profile(str(folder / "host.yaml"))
    table = analyze(load_model("demo:digits-cnn"))
    return Quick(messages, again, load_samples(folder / "s.npz"), table, predict_latency(table, again, 1).latency_ms,
                 predict_latency(table, again, 8).latency_ms)


def test_quick_calibration_writes_a_profile_that_loads_and_predicts(quick):
    again = quick.profile
    assert again.provenance is not None and again.provenance.threads >= 1
    assert again.peak_gflops["fp32"] > 0 and again.memory_bandwidth_gbs > 0
    assert again.memory_read_bandwidth_gbs and again.efficiency.split
    assert 8 in again.batch_efficiency and again.eff("fp32", 8).split  # calibrated at batch 8 too
    assert quick.fit["fp32.b1.networks"] >= QUICK_LEAST["fp32 networks"]
    assert any(m.startswith("fit fp32 batch 1") for m in quick.messages)  # progress is shown
    assert 0 < quick.p1 < quick.p8


def test_calibration_records_the_machine_state_it_was_timed_in(quick):
    fit = quick.fit
    # the machine's state while it was timed: fork and join of all threads, a few microseconds
    assert 0.1 < fit["sync_probe_us"] < 1000 and fit["sync_probe_range_us"] >= 0
    # the state is read throughout (about once a second), the profile's is the one most readings were in
    assert fit["state.readings"] >= 3 and 0 < fit["state.in_state_share"] <= 1
    assert fit["state.memory_copy_gbs"] == quick.profile.memory_bandwidth_gbs
    assert 0 <= fit["state.fp32.b1.other_state"] <= fit["fp32.b1.networks"]  # every sample fitted, those counted
    assert any(m.startswith("machine state: sync probe") for m in quick.messages)


def test_kept_samples_refit_to_the_same_profile_and_pool(quick):
    kept = quick.kept
    assert kept.runs == 1 and kept.seed_offset == 0
    # every network kept was fitted but those timed while the pace ran over PACE_BAND away (a stall of the VM)
    assert len(kept.nets[1]) - quick.fit["pace.dropped"] <= quick.fit["fp32.b1.networks"] <= len(kept.nets[1])
    refit = fit_profile(kept)
    assert predict_latency(quick.table, refit, 1).latency_ms == pytest.approx(quick.p1, rel=1e-9)
    pooled = merge_samples([kept, kept])
    assert pooled.runs == 2 and len(pooled.nets[8]) == 2 * len(kept.nets[8])
    assert len(pooled.retimed) == 2 * len(kept.retimed)
    assert fit_profile(pooled).provenance.fit["calibrations_pooled"] == 2


def test_a_calibration_to_pool_times_other_networks(quick):
    more = collect_samples(quick=True, int8=False, budget_s=2.0, after=[quick.kept])
    assert more.seed_offset == SEED_STRIDE
    assert not {n.label for n in more.nets[1]} & {n.label for n in quick.kept.nets[1]}


def test_samples_of_another_machine_runtime_or_pace_are_not_pooled(quick, tmp_path):
    kept = quick.kept
    with pytest.raises(ValueError, match="threads"):  # another machine's or runtime's samples are refused
        merge_samples([kept, dataclasses.replace(kept, threads=kept.threads + 1)])
    with pytest.raises(ValueError, match="isa"):  # a CPU of the same name with other features too
        merge_samples([kept, dataclasses.replace(kept, isa="avx2+avx512f+avx512_vnni")])
    with pytest.raises(ValueError, match="pace"):  # samples kept before the pace was read cannot join them
        merge_samples([kept, dataclasses.replace(kept, pace_readings=[])])
    with pytest.raises(ValueError, match="not a calibration's samples"):
        (tmp_path / "bad.pkl").write_bytes(b"not samples")
        load_samples(tmp_path / "bad.pkl")


def test_the_profile_keeps_the_pace_its_samples_were_brought_to(quick):
    kept, again, fit = quick.kept, quick.profile, quick.fit
    # the pace network was read throughout; the fit brought the samples to its median pace, which the profile keeps
    assert len(kept.pace_readings) >= 3 and all(n.pace_ms > 0 for n in kept.nets[1] + kept.nets[8])
    assert again.calibrated_pace() == pytest.approx(float(np.median(kept.pace_readings)), rel=1e-3)
    assert fit["pace_ms"] == pytest.approx(again.provenance.pace_ms) and fit["pace.p5_ms"] <= fit["pace.p95_ms"]
    assert any(m.startswith("pace: the pace network ran") for m in quick.messages)


def test_retimed_networks_measure_how_much_latency_follows_the_pace(quick):
    kept, again, fit = quick.kept, quick.profile, quick.fit
    # the first networks' totals were timed again at the end (no row times), between two pace readings; how much
    # the latency followed the pace between the two timings is the profile's elasticity
    firsts = {n.label for n in kept.nets[1][:len(kept.retimed) // 2] + kept.nets[8][:len(kept.retimed) // 2]}
    assert kept.retimed and {n.label for n in kept.retimed} == firsts
    assert all(n.total_seconds > 0 and n.pace_ms > 0 and n.row_seconds.size == 0 for n in kept.retimed)
    elasticity, pairs = pace_elasticity(kept)
    assert 0 < pairs <= len(kept.retimed) and fit["pace.pairs"] == pairs
    assert 0 <= elasticity <= 1 and again.provenance.pace_elasticity == pytest.approx(elasticity, abs=1e-4)
    assert again.pace_elasticity() == again.provenance.pace_elasticity == fit["pace.elasticity"]
    levelled, _ = at_one_pace(kept, elasticity)  # what was fitted: the same samples levelled by hand, fitted unpaced
    by_hand = fit_profile(dataclasses.replace(levelled, pace_readings=[]))
    assert by_hand.calibrated_pace() is None
    assert predict_latency(quick.table, by_hand, 8).latency_ms == pytest.approx(quick.p8, rel=1e-9)


def test_the_profile_records_this_cpu_and_warns_on_another(quick):
    again = quick.profile
    # the CPU's features are recorded, and the channel block the fit assumes follows them
    assert quick.kept.isa == cpu_isa() and again.provenance.isa == cpu_isa()
    assert again.channel_multiple == channel_multiple(cpu_isa()) and foreign_note(again) is None
    assert key_of(again) == host_key()  # calibrated here: this machine's
    other_cpu = again.model_copy(update={"provenance": again.provenance.model_copy(update={"isa": "amx_int8"})})
    assert "amx_int8" in foreign_note(other_cpu) and "--hardware host" in foreign_note(other_cpu)


def test_channel_multiple_follows_the_vector_width():
    assert channel_multiple("avx2+avx512f+avx512_vnni") == 16 and channel_multiple("avx2") == 8
    assert channel_multiple("") == 16  # unknown features: AVX-512's block, as before they were recorded


def test_a_host_profile_of_another_cpu_is_flagged(tmp_path):
    """A host profile calibrated on a CPU with other features than this one says so wherever it predicts."""
    host = load_profile("host")
    path = tmp_path / "host.yaml"
    save_profile(host.model_copy(update={"provenance": host.provenance.model_copy(update={"isa": "amx_int8"})}), path)
    runner = CliRunner()
    r = runner.invoke(app, ["hardware", "show", str(path)])
    assert r.exit_code == 0 and "warning: the host profile was calibrated on another machine" in r.stderr
    r = runner.invoke(app, ["hardware", "show", str(path), "--json"])
    assert "amx_int8" in json.loads(r.stdout)["warning"]
    r = runner.invoke(app, ["estimate", "demo:digits-cnn", "--hardware", str(path)])
    assert r.exit_code == 0 and "calibrated on another machine" in r.stderr and "differs in isa" in r.stderr
    r = runner.invoke(app, ["estimate", "demo:digits-cnn", "--hardware", str(path), "--json"])
    out = json.loads(r.stdout)
    assert out["pred"]["latency_ms"] > 0 and "--hardware host" in out["hardware"]["warning"]
    # another machine's profile is never anchored on this one: its target is not here
    assert out["latency_basis"] == "profile" and out["hardware"]["anchor"] is None
    assert out["hardware"]["profile"]["warning"] and out["hardware"]["profile"]["isa"] == "amx_int8"
    r = runner.invoke(app, ["plan", "demo:digits-cnn", "--hardware", str(path), "--nsga-evals", "0", "--json"])
    assert r.exit_code == 0 and "amx_int8" in json.loads(r.stdout)["warning"] and "warning: the host" in r.stderr
    here = host.model_copy(update={"provenance": host.provenance.model_copy(update={"isa": cpu_isa()})})
    assert foreign_note(here) is None and foreign_note(load_profile("jetson-nano")) is None  # datasheet: no CPU


def test_host_is_this_machine_never_a_profile_of_another(tmp_path, monkeypatch):
    """`host` is looked up in the cache under this machine's key (CPU, features, threads, torch): a profile
    calibrated for another CPU is not used for it, and without one of its own it cannot be had silently."""
    from estimators.errors import UserInputError
    from hardware import hostprofile
    from hosts import seed_host

    monkeypatch.setenv("DEPLOYFIT_CACHE_DIR", str(tmp_path / "cache"))
    here = host_key()
    other = {**here, "cpu": "Some Other CPU", "isa": "avx2"}
    seed_host(key=other)  # another machine's profile in the same cache
    assert host_profile_path(other).is_file() and not host_profile_path(here).is_file()
    assert host_profile_path(other).parent == tmp_path / "cache" / "profiles"
    with pytest.raises(UserInputError, match="no host profile for this machine"):
        hostprofile.load_host(calibrate=False)
    # the same cache seen from that other machine (its key faked): its own profile is found and used
    monkeypatch.setattr(hostprofile, "host_key", lambda: other)
    assert key_of(hostprofile.load_host(calibrate=False)) == other
    monkeypatch.undo()
    # a file at this machine's path whose provenance names another machine is not taken for this one either
    monkeypatch.setenv("DEPLOYFIT_CACHE_DIR", str(tmp_path / "cache"))
    host_profile_path(here).write_text(host_profile_path(other).read_text())
    with pytest.raises(UserInputError, match="no host profile for this machine"):
        hostprofile.load_host(calibrate=False)
    # `hardware list` says whether this machine is calibrated; the repository ships reference profiles beside it
    r = CliRunner().invoke(app, ["hardware", "list", "--json"])
    rows = {p["name"]: p["runtime"] for p in json.loads(r.stdout)["profiles"]}
    assert "not calibrated yet" in rows["host"] and "cpu-avx2" in rows


def test_calibrate_cli_pool_errors(tmp_path):
    """--pool and --refit: bad input is a clear error before anything is timed, and no profile is written."""
    runner = CliRunner()
    out = tmp_path / "host.yaml"
    r = runner.invoke(app, ["calibrate", "--refit", "--out", str(out)])
    assert r.exit_code == 2 and "--pool" in r.stderr and not out.exists()
    r = runner.invoke(app, ["calibrate", "--pool", str(tmp_path / "missing.pkl"), "--refit", "--out", str(out)])
    assert r.exit_code == 2 and "no such samples" in r.stderr and not out.exists()
    (tmp_path / "bad.pkl").write_bytes(b"x")
    r = runner.invoke(app, ["calibrate", "--pool", str(tmp_path / "bad.pkl"), "--refit", "--out", str(out)])
    assert r.exit_code == 2 and "not a calibration" in r.stderr and not out.exists()


@pytest.mark.timing
def test_int8_kernel_fit_predicts_kernels_it_has_not_seen():
    """The INT8 convolution/linear kernels compiled INT8 graphs call, timed directly on a small budget: a fit
    on half of them predicts the other half (median error within 50%, in the right order)."""
    import numpy as np
    from scipy.stats import spearmanr

    from hardware.calibrate.fit import fit_split_model, predict_rows
    from hardware.calibrate.int8 import int8_op_samples
    from hardware.calibrate.sampling import CACHE_SHARE, CHANNEL_MULTIPLE, cache_bytes
    from hardware.latency import latency_kinds

    cache = CACHE_SHARE * cache_bytes()
    best = None
    for _ in range(2):  # kernels timed while the machine was busy (another process) are timed again, as calibrate does
        ops = int8_op_samples(3.0, lambda m: None, batches=(1,), min_ops=60)[0][1]
        assert len(ops) >= 60 and all(n.total_seconds > 0 and n.table.n == 1 for n in ops)
        coef, _, _ = fit_split_model(ops[::2], CHANNEL_MULTIPLE, cache)
        test = [n for n in ops[1::2] if latency_kinds(n.table)[0] in coef]
        pred = np.array([p.sum() for p in predict_rows(test, coef, 0.0, CHANNEL_MULTIPLE, cache)])
        meas = np.array([n.total_seconds for n in test])
        assert len(test) >= 20
        got = (np.median(np.abs(np.log(pred / meas))), spearmanr(pred, meas)[0])
        best = got if best is None or got[1] > best[1] else best
        if got[0] < np.log(1.5) and got[1] > 0.8:
            break
    assert best[0] < np.log(1.5)
    assert best[1] > 0.8


def test_hardware_commands_and_estimate_latency():
    runner = CliRunner()
    r = runner.invoke(app, ["hardware", "list", "--json"])
    assert r.exit_code == 0
    names = [p["name"] for p in json.loads(r.stdout)["profiles"]]
    assert "host" in names
    r = runner.invoke(app, ["hardware", "show", "host", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["name"] == "host"
    r = runner.invoke(app, ["estimate", "demo:digits-cnn", "--hardware", "host", "--batch-size", "4", "--json"])
    assert r.exit_code == 0
    d = json.loads(r.stdout)
    assert d["pred"]["latency_ms"] > 0 and d["hardware"]["batch_size"] == 4
    r = runner.invoke(app, ["estimate", "demo:digits-cnn", "--hardware", "no-such-device", "--json"])
    assert r.exit_code == 2 and "unknown hardware" in r.stderr


def test_quantized_max_pool_fit_sees_the_channel_tail():
    """Quantized max pooling timed on a small budget: the fit prices the channels beyond a multiple of 32
    (a scalar tail) and predicts the samples it was fitted on."""
    import numpy as np

    from hardware.calibrate.fit import fit_pool
    from hardware.calibrate.int8 import QPOOL_LANES, int8_pool_samples
    from hardware.latency import row_features, remainder_share

    samples = int8_pool_samples(2.0, lambda m: None, batches=(1,), min_ops=12)
    assert len(samples) >= 12 and all(s.total_seconds > 0 for s in samples)
    x = fit_pool(samples)
    assert x[2] > x[1] > 0  # a FLOP in the tail costs more than a vectorised one
    pred, meas = [], []
    for s in samples:
        flops, _, _, kinds, cin, _ = row_features(s.table, s.batch)
        i = int(np.flatnonzero(kinds == "maxpool")[0])
        pred.append(x[0] + flops[i] * (x[1] + x[2] * remainder_share(cin[i:i + 1], QPOOL_LANES)[0]))
        meas.append(s.total_seconds)
    assert np.median(np.abs(np.log(np.array(pred) / np.array(meas)))) < np.log(1.5)


@pytest.mark.timing
def test_compiled_int8_network_is_profiled_into_its_parts():
    """A quantized, compiled synthetic network: its oneDNN kernels, generated loops and the rest of the
    call are told apart by the profiler (names that change with torch would read as zero)."""
    import torch
    import torch._inductor.config as inductor_config

    import time

    from hardware.calibrate.int8 import profiled_parts
    from hardware.synthetic import synthetic_cnn
    from tasks.quantize_exec import compiled_int8

    model, shape = next((m, s) for m, s in map(synthetic_cnn, range(100, 200))
                        if s[2] <= 96 and any(isinstance(x, torch.nn.MaxPool2d) for x in m.modules()))
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):  # as calibration compiles them
        fn = compiled_int8(model, torch.randn(2, *shape[1:]))
        x = torch.randn(1, *shape[1:])
        with torch.inference_mode():
            fn(x), fn(x)
        # the parts are bounded by the wall time of the very calls they were profiled in: a total timed in another
        # moment of this drifting machine can be half of it
        t0 = time.perf_counter()
        kern, pool, loops = profiled_parts(fn, x, runs=5)
        per_call = (time.perf_counter() - t0) / 5
    assert kern > 0 and pool > 0 and loops > 0  # the first quantize of the input is a generated loop
    assert kern + pool + loops < per_call



@pytest.mark.timing
def test_what_a_compiled_int8_graph_adds_is_timed_in_small_graphs():
    """The three chains compile and time against their kernel alone: the long chain takes longer than the short one
    (five times the convolutions), and the call's, a kernel's wrapper's and a generated loop's prices come out
    non-negative and below the long chain's own time."""
    from hardware.calibrate.fit import wrapper_costs
    from hardware.calibrate.int8 import WRAPPER_CHAIN, WrapperChains
    from tasks.quantize_exec import compiled_int8

    messages = []
    chains = WrapperChains(compiled_int8, messages.append)
    assert messages and messages[0].startswith("compiling three small INT8 graphs")
    sample = chains()
    assert chains() is chains.samples[-1] and len(chains.samples) == 2  # timed again without compiling again
    assert (sample.short_ops, sample.long_ops) == WRAPPER_CHAIN and sample.table.n == 1
    assert sample.long_s > sample.short_s > sample.alone_s > 0 and sample.gated_s > 0
    assert all(0 <= c < sample.long_s for c in wrapper_costs(chains.samples))


def test_first_use_of_host_calibrates_this_machine_and_says_so(tmp_path, monkeypatch):
    """A command that needs `host` on a machine without its profile calibrates it first (quick), shows its
    progress, says so, and keeps it in the cache under this machine's key; the next use loads it."""
    from hardware.hostprofile import describe

    monkeypatch.setenv("DEPLOYFIT_CACHE_DIR", str(tmp_path / "cache"))
    messages = []
    prof = load_profile("host", progress=messages.append)
    assert messages[0].startswith("no host profile for this machine") and describe(host_key()) in messages[0]
    assert any(m.startswith("fp32 networks: ") for m in messages)  # progress of the timing
    assert messages[-1] == f"host profile written to {host_profile_path()}"
    assert key_of(prof) == host_key() and prof.name == "host"
    again = []
    assert load_profile("host", progress=again.append) == prof and again == []  # loaded, not calibrated again


@pytest.mark.timing
def test_the_int8_group_rule_read_from_kernels_holds_in_the_compiled_graph():
    """The INT8 grouped-convolution rule read from oneDNN's kernels timed alone (int8_group_samples, group_rule)
    holds in the compiled INT8 graph a pruned model runs as: a network whose channels per group are off the rule's
    multiple takes about the slow kernel's time per FLOP, and one on it far less; with no rule, neither is slow."""
    import torch
    from torch import nn

    from hardware.calibrate.int8 import int8_group_samples, group_rule
    from hardware.measure import measure_interleaved
    from tasks.quantize_exec import compiled_int8

    multiple, s_per_flop = group_rule(int8_group_samples(lambda m: None))
    on = 4 * (multiple or 4)  # 16 channels per group (32 for a multiple of 8, 64 for 16)
    off = on - 1
    fns, xs, flops = [], [], []
    for pg in (on, off):
        c = 4 * pg
        model = nn.Sequential(*[m for _ in range(3) for m in (nn.Conv2d(c, c, 3, padding=1, groups=4, bias=False),
                                                               nn.BatchNorm2d(c), nn.ReLU())]).eval()
        fns.append(compiled_int8(model, torch.randn(2, c, 16, 16)))
        xs.append(torch.randn(1, c, 16, 16))
        flops.append(3 * 2.0 * c * pg * 9 * 16 * 16)
    r = measure_interleaved(fns, xs, budget_s=1.0)
    per_flop = [t / 1e3 / f for t, f in zip(r["latency_ms"], flops)]
    if multiple:
        assert per_flop[1] > 5 * per_flop[0]
        assert 0.4 < per_flop[1] / s_per_flop < 2.5  # the graph's slow convolutions at about the kernel's rate
    else:
        assert per_flop[1] < 3 * per_flop[0]
