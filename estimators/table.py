"""The LayerTable: one row per operator, vectorised so that compression estimates are array arithmetic.

A table holds the traced model (rows, their cost terms, the channel composition of every row's input
and output, tensor lifetimes) and a compression *state*: channels kept per pruning group and bytes per
element of weights and activations per row. Estimators return a new table with a new state; `totals`
evaluates it. `Evaluator` is the one implementation of that arithmetic, over K candidates of a table at once
(the search's); `evaluate` and `totals` are its K = 1 case. No model is touched after analysis.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import sparse

from . import registry as R
from .pruning import PrunePlan
from .trace import Trace

NQ = len(R.QUANTITIES)
QI = R.Q_INDEX
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


@dataclass
class State:
    kept: np.ndarray  # per dependency-graph group: root channels kept
    wbytes: np.ndarray  # per row: bytes per parameter element
    bbytes: np.ndarray  # per row: bytes per float buffer element
    abytes: np.ndarray  # per row: bytes per activation element it writes (and, for its inputs, reads)
    fixed_scale: np.ndarray  # per row: multiplier of fixed_bytes (0 when folded away)
    wscale: np.ndarray  # per row: multiplier of param/buffer bytes (0 when folded into another row)
    extra_per_cout: np.ndarray  # per row: extra stored bytes per output channel (scales, zero points, folded bias)
    extra_const: np.ndarray  # per row: extra stored bytes (activation scales etc.)
    wdtype: list[str]  # per row: storage dtype name of its weights
    xdtype: list[str]  # per row: the dtype it computes in (weight-only int8 still computes in fp32)
    steps: list[dict] = field(default_factory=list)

    def copy(self) -> "State":
        return State(self.kept.copy(), self.wbytes.copy(), self.bbytes.copy(), self.abytes.copy(), self.fixed_scale.copy(),
                     self.wscale.copy(), self.extra_per_cout.copy(), self.extra_const.copy(), list(self.wdtype),
                     list(self.xdtype), list(self.steps))


@dataclass
class LayerTable:
    model: str
    input_shape: tuple  # estimators.modelspec.InputShape: one shape, or one per input for a model of several
    batch: int
    names: list[str]
    ops: list[str]
    kinds: list[str]
    module_names: list[str]
    is_module: np.ndarray
    in_shapes: list[list[tuple[int, ...]]]
    out_shapes: list[list[tuple[int, ...]]]
    cin0: np.ndarray
    cout0: np.ndarray
    has_bias: np.ndarray
    src_row: np.ndarray  # producer row of the first input (-1: model input or none)
    # cost terms
    t_row: np.ndarray
    t_q: np.ndarray
    t_num: np.ndarray
    t_den: np.ndarray
    t_a: np.ndarray
    t_b: np.ndarray
    # channel composition: chan' = chan0 - sum(mult * pruned[group]) over segments
    in_seg: tuple[np.ndarray, np.ndarray, np.ndarray]  # (row, group, mult)
    out_seg: tuple[np.ndarray, np.ndarray, np.ndarray]
    # activation storages for peak memory
    st_bytes0: np.ndarray  # bytes at fp32 storage... per storage (elements * elem bytes of the traced dtype)
    st_elems_per_chan: np.ndarray
    st_chan0: np.ndarray
    st_row: np.ndarray  # producer row (for the activation dtype); -1 for a model input
    st_birth: np.ndarray
    st_death: np.ndarray
    st_seg: tuple[np.ndarray, np.ndarray, np.ndarray]  # (storage, group, mult)
    group_channels: np.ndarray  # per dg group: root channels at analysis
    plan: PrunePlan
    unsupported: list[dict]
    state: State
    notes: list[str] = field(default_factory=list)
    ksize: np.ndarray | None = None  # per row: kernel elements of a convolution or pooling window, 1 otherwise
    groups: np.ndarray | None = None  # per row: convolution groups, 1 otherwise

    @property
    def n(self) -> int:
        return len(self.names)

    def with_state(self, state: State) -> "LayerTable":
        return replace(self, state=state)


# ----------------------------------------------------------------------------------------------
# building


def _comp_key(segs: dict[int, int]) -> tuple:
    return tuple(sorted((g, m) for g, m in segs.items() if m))


def _stored(cost: "R.Cost", tensors: list) -> "R.Cost":
    """`cost` plus what `tensors` (parameters or buffers a row keeps) store: float parameters as params, float
    buffers as buffers, anything else as fixed bytes."""
    for p in tensors:
        if p.is_floating_point():
            cost.add("params" if p.requires_grad or type(p).__name__ == "Parameter" else "buffers", p.numel())
        else:
            cost.add("fixed_bytes", p.numel() * p.element_size())
    return cost


class _Channels:
    """The channel composition of every tensor: for each pruning group, how many of the tensor's channels each
    root channel of the group accounts for. `unfollowed` names the groups the estimator cannot follow, and why."""

    def __init__(self, tr: Trace, plan: PrunePlan):
        self.T = tr.tensors
        self.plan = plan
        self.comp: dict[int, dict[int, int]] = {tid: {} for tid in tr.input_tids}
        self.unfollowed: dict[int, str] = {}

    def get(self, tid: int) -> dict[int, int]:
        return self.comp.get(tid, {})

    def breaks(self, segs: dict[int, int], why: str) -> None:
        for g in segs:
            self.unfollowed.setdefault(g, why)

    def from_deps(self, deps: list[tuple[int, int]]) -> dict[int, int]:
        gch = self.plan.group_channels
        out: dict[int, int] = {}
        for g, cnt in deps:
            if cnt % gch[g]:
                self.unfollowed.setdefault(g, "a channel mapping that is not a whole multiple of the group")
                continue
            out[g] = out.get(g, 0) + cnt // gch[g]
        return out

    def propagate(self, rows: list, output_tids: list[int]) -> None:
        """Every row's outputs' compositions from its inputs', in execution order."""
        for r in rows:
            ins = [self.get(t) for t in r.inputs]
            if r.cost is None:
                for x in ins:
                    self.breaks(x, f"channels pass through {r.op}, which the estimator cannot cost")
                for t in r.outputs:
                    self.comp[t] = {}
                continue
            if not r.cost.channel_exact:
                for x in ins:
                    self.breaks(x, f"{r.name} ({r.op}) does not scale with channels")
            if r.is_module:
                self._module(r, ins)
            else:
                self._function(r, ins)
        # model outputs: nothing may prune them (the classifier is ignored; anything else reaching them is not followed)
        for t in output_tids:
            self.breaks(self.get(t), "the group reaches the model output")

    def _module(self, r, ins: list[dict[int, int]]) -> None:
        T, x0, mname = self.T, (ins[0] if ins else {}), r.module_name
        din = self.from_deps(self.plan.module_in.get(mname, []))
        dout = self.from_deps(self.plan.module_out.get(mname, []))
        if r.cost.kind in ("conv", "gemm", "attention"):  # a new channel space: what enters must match torch-pruning's
            if _comp_key(din) != _comp_key(x0):
                why = f"the channels entering {mname} do not map one-to-one through the ops before it"
                self.breaks(din, why)
                self.breaks(x0, why)
            out = dout
        else:  # channels pass through (depthwise conv, norm, activation, pooling)
            out = dout if dout else dict(x0)
            if dout and _comp_key(dout) != _comp_key(x0):
                why = f"{mname} couples channels the estimator maps differently"
                self.breaks(dout, why)
                self.breaks(x0, why)
        for t in r.outputs:
            self.comp[t] = dict(out) if T[t].meta.chan == (T[r.outputs[0]].meta.chan) else {}

    def _function(self, r, ins: list[dict[int, int]]) -> None:
        T, y = self.T, self.T[r.outputs[0]].meta
        out = {"same": self._same, "cat": self._cat, "reshape": self._reshape}.get(r.rule, self._fixed)(r, ins, y)
        for t in r.outputs:
            self.comp[t] = dict(out) if T[t].meta.chan == y.chan else {}
            if T[t].meta.chan != y.chan and out:
                self.breaks(out, f"{r.name} ({r.op}) splits channels")

    def _same(self, r, ins, y) -> dict[int, int]:
        """The output's channels are those of the input shaped like it (else of one with as many channels)."""
        T = self.T
        same_shape = [x for tid, x in zip(r.inputs, ins) if T[tid].shape == y.shape]
        same_chan = [(tid, x) for tid, x in zip(r.inputs, ins) if T[tid].meta.chan == y.chan]
        src = (same_shape or [x for _, x in same_chan] or [None])[0]
        if src is None:
            for x in ins:
                self.breaks(x, f"{r.name} ({r.op}) changes the channel count")
            src = {}
        for tid, x in same_chan:
            if x and _comp_key(x) != _comp_key(src):
                why = f"{r.name} ({r.op}) joins channels that torch-pruning couples differently"
                self.breaks(x, why)
                self.breaks(src, why)
        return dict(src)

    def _cat(self, r, ins, y) -> dict[int, int]:
        dim = r.kwargs.get("dim", r.args[1] if len(r.args) > 1 else 0)
        nd = len(y.shape)
        if isinstance(dim, int) and (dim % nd) == (y.chan_axis % nd):
            out: dict[int, int] = {}
            for x in ins:
                for g, m in x.items():
                    out[g] = out.get(g, 0) + m
            return out
        return dict(ins[0] if ins else {})

    def _reshape(self, r, ins, y) -> dict[int, int]:
        x = self.T[r.inputs[0]].meta if r.inputs else None
        x0 = ins[0] if ins else {}
        out: dict[int, int] = {}
        if x is not None and x0:
            if len(x.shape) >= 3 and len(y.shape) == 2 and x.chan_axis == 1 and y.shape[0] == x.shape[0] \
                    and y.shape[1] == math.prod(x.shape[1:]):
                k = math.prod(x.shape[2:])
                out = {g: m * k for g, m in x0.items()}
            elif y.chan == x.chan and y.shape[0] == x.shape[0] and (len(y.shape) == len(x.shape) or y.numel == x.numel) \
                    and (r.op not in ("permute", "transpose", "swapaxes", "movedim", "t") or y.shape == x.shape):
                out = dict(x0)
            else:
                self.breaks(x0, f"channels pass through {r.name} ({r.op}), a reshape the estimator does not follow")
        for s in ins[1:]:
            self.breaks(s, f"channels pass through {r.name} ({r.op}), a reshape the estimator does not follow")
        return out

    def _fixed(self, r, ins, y) -> dict[int, int]:
        for x in ins:
            self.breaks(x, f"channels pass through {r.name} ({r.op}), which makes a new channel space")
        return {}

    def segments(self, tids_of_rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, group, channels per root channel) of the given tensor of every row (none where a row has none)."""
        rr, gg, mm = [], [], []
        for i, tids in enumerate(tids_of_rows):
            for t in tids:
                for g, m in self.get(t).items():
                    rr.append(i); gg.append(g); mm.append(m)
        return np.array(rr, dtype=np.int64), np.array(gg, dtype=np.int64), np.array(mm, dtype=np.int64)


def _cost_terms(costs: list) -> dict[str, np.ndarray]:
    """Every row's cost terms as flat arrays: t_row, t_q (the quantity's index), t_num, t_den, t_a, t_b."""
    cols: list[list[int]] = [[], [], [], [], [], []]
    for i, c in enumerate(costs):
        for q, num, den, a, b in c.terms:
            for col, v in zip(cols, (i, QI[q], num, den, a, b)):
                col.append(v)
    return {k: np.array(v, dtype=np.int64) for k, v in zip(("t_row", "t_q", "t_num", "t_den", "t_a", "t_b"), cols)}


def _storages(tr: Trace, ch: _Channels) -> dict[str, Any]:
    """Activation storages: one per storage key, sized by its largest tensor, alive from its first write to its last
    read; the model's outputs and inputs (held by the caller) stay alive to the end."""
    rows, T = tr.rows, tr.tensors
    st_index: dict[int, int] = {}
    st_bytes, st_pc, st_ch, st_row, st_birth, st_death, st_tid = [], [], [], [], [], [], []
    last_use: dict[int, int] = {}
    for i, r in enumerate(rows):
        for t in r.inputs:
            last_use[T[t].storage] = i
    for t in tr.output_tids + tr.input_tids:
        last_use[T[t].storage] = len(rows)
    for info in T:
        if info.producer == -2 and info.storage not in st_index:
            continue  # constants made outside rows (tensors the model builds on the fly) are tiny
        k = info.storage
        nbytes = info.meta.numel * info.elem_bytes
        birth = max(info.producer, -1)
        if k not in st_index:
            st_index[k] = len(st_bytes)
            st_bytes.append(nbytes); st_pc.append(info.meta.per_chan * info.elem_bytes); st_ch.append(info.meta.chan)
            st_row.append(info.producer); st_birth.append(birth); st_death.append(last_use.get(k, birth)); st_tid.append(info.tid)
        else:
            j = st_index[k]
            st_birth[j] = min(st_birth[j], birth)
            if nbytes > st_bytes[j]:
                st_bytes[j] = nbytes; st_pc[j] = info.meta.per_chan * info.elem_bytes; st_ch[j] = info.meta.chan
                st_tid[j] = info.tid
    st_death = [max(d, b) for d, b in zip(st_death, st_birth)]
    i64 = lambda a: np.array(a, dtype=np.int64)  # noqa: E731
    return dict(st_bytes0=i64(st_bytes), st_elems_per_chan=i64(st_pc), st_chan0=i64(st_ch), st_row=i64(st_row),
                st_birth=i64(st_birth), st_death=i64(st_death), st_seg=ch.segments([[t] for t in st_tid]))


def _unsupported(tr: Trace) -> list[dict[str, Any]]:
    T = tr.tensors
    return [{"layer": r.name, "op": r.op, "input_shapes": [list(T[t].shape) for t in r.inputs],
             "output_shapes": [list(T[t].shape) for t in r.outputs],
             "stored_elements": int(sum(p.numel() for p in r.stored)),
             "note": "its parameters count in params and size; its compute and memory traffic are not estimated"}
            for r in tr.rows if r.cost is None]


def build_table(model_spec: str, input_shape: tuple, tr: Trace, plan: PrunePlan) -> tuple["LayerTable", dict[int, str]]:
    """Assemble the table in three steps: the channel compositions propagated through the rows (_Channels), the
    rows' cost terms (_cost_terms), the activation storages (_storages). Returns it with the groups it cannot
    follow."""
    rows, T, n = tr.rows, tr.tensors, len(tr.rows)
    ch = _Channels(tr, plan)
    ch.propagate(rows, tr.output_tids)
    # an unsupported row's compute is unknown, but what it stores is not: its parameters count in params and size
    cost_rows = [r.cost if r.cost is not None else _stored(R.Cost("unsupported", 0, 0), r.stored) for r in rows]
    # unowned parameters/buffers are stored too: one row each
    extra_names = [f"param:{pname}" for pname, _ in tr.unowned]
    extra_costs = [_stored(R.Cost("param", 0, 0), [p]) for _, p in tr.unowned]
    ne = len(extra_names)
    ntot = n + ne
    ng = max(plan.n_dg_groups, 1)
    gchan = np.array([plan.group_channels.get(g, 0) for g in range(ng)], dtype=np.int64)
    state = State(
        kept=gchan.copy(),
        wbytes=np.full(ntot, 4.0), bbytes=np.full(ntot, 4.0), abytes=np.full(ntot, 4.0),
        fixed_scale=np.ones(ntot), wscale=np.ones(ntot), extra_per_cout=np.zeros(ntot), extra_const=np.zeros(ntot),
        wdtype=["fp32"] * ntot, xdtype=["fp32"] * ntot,
    )
    i64 = lambda a: np.array(a, dtype=np.int64)  # noqa: E731
    table = LayerTable(
        model=model_spec, input_shape=tuple(input_shape), batch=tr.batch,
        names=[r.name for r in rows] + extra_names,
        ops=[r.op for r in rows] + ["parameter"] * ne,
        kinds=[c.kind for c in cost_rows] + ["param"] * ne,
        ksize=i64([c.ksize for c in cost_rows] + [1] * ne),
        groups=i64([c.groups for c in cost_rows] + [1] * ne),
        module_names=[r.module_name for r in rows] + [x[6:] for x in extra_names],
        is_module=np.array([r.is_module for r in rows] + [False] * ne),
        in_shapes=[[T[t].shape for t in r.inputs] for r in rows] + [[]] * ne,
        out_shapes=[[T[t].shape for t in r.outputs] for r in rows] + [[]] * ne,
        cin0=i64([c.cin for c in cost_rows] + [0] * ne), cout0=i64([c.cout for c in cost_rows] + [0] * ne),
        has_bias=np.array([c.bias for c in cost_rows] + [False] * ne),
        src_row=i64([T[r.inputs[0]].producer if r.inputs else -1 for r in rows] + [-1] * ne),
        **_cost_terms(cost_rows + extra_costs),
        in_seg=ch.segments([r.inputs[:1] for r in rows]), out_seg=ch.segments([r.outputs[:1] for r in rows]),
        **_storages(tr, ch),
        group_channels=gchan, plan=plan, unsupported=_unsupported(tr), state=state,
    )
    return table, ch.unfollowed


# ----------------------------------------------------------------------------------------------
# evaluation


@dataclass
class Evaluated:
    """The estimators' arithmetic for one table (`evaluate`: arrays per row) or for K candidates of it
    (`Evaluator`: arrays K x rows, peak_act_bytes one per candidate)."""

    cin: np.ndarray
    cout: np.ndarray
    q: np.ndarray  # (K x) rows x quantities
    weight_bytes: np.ndarray  # (K x) per row, stored bytes
    act_read_bytes: np.ndarray
    act_write_bytes: np.ndarray
    peak_act_bytes: Any  # int, or an array of K

    def one(self, k: int = 0) -> "Evaluated":
        """Candidate k of a K-candidate evaluation."""
        return Evaluated(self.cin[k], self.cout[k], self.q[k], self.weight_bytes[k], self.act_read_bytes[k],
                         self.act_write_bytes[k], int(self.peak_act_bytes[k]))


def _dense(seg: tuple[np.ndarray, np.ndarray, np.ndarray], n_groups: int, n_cols: int) -> np.ndarray:
    """(col, group, mult) segments as a groups x cols matrix: channels lost per pruned root channel."""
    out = np.zeros((n_groups, n_cols))
    c, g, m = seg
    if len(c):
        np.add.at(out, (g, c), m)
    return out


class Evaluator:
    """The estimators' arithmetic over K candidates of one table at once. Candidates of a table differ only in
    the root channels each pruning group keeps (`kept`, K x groups); bytes per element and dtypes are the
    table's state. `evaluate` is the K = 1 case, search.batch.BatchEvaluator the search's."""

    def __init__(self, table: LayerTable):
        t = table
        n, n_dg, T, S = t.n, len(t.group_channels), len(t.t_row), len(t.st_chan0)
        self.table = t
        self.Min = _dense(t.in_seg, n_dg, n)
        self.Mout = _dense(t.out_seg, n_dg, n)
        self.Mst = _dense(t.st_seg, n_dg, S)
        # term -> (row, quantity) cell: a row's quantities are the sums of its terms
        self.A = sparse.csr_matrix((np.ones(T), (np.arange(T), t.t_row * NQ + t.t_q)), shape=(T, n * NQ))
        self.prod_bytes = np.where(t.st_row >= 0, t.state.abytes[np.maximum(t.st_row, 0)], 4.0) / 4.0
        # storage lifetimes: +1 at the step after its producer, -1 after its last reader
        B = np.zeros((S, n + 3))
        if S:
            np.add.at(B, (np.arange(S), t.st_birth + 1), 1.0)
            np.add.at(B, (np.arange(S), t.st_death + 2), -1.0)
        self.B = B

    def __call__(self, kept: np.ndarray) -> Evaluated:
        t, s = self.table, self.table.state
        kept = np.atleast_2d(kept)
        K, n = len(kept), t.n
        P = (t.group_channels[None, :] - kept).astype(np.float64)
        cin = (t.cin0[None, :] - P @ self.Min).round().astype(np.int64)
        cout = (t.cout0[None, :] - P @ self.Mout).round().astype(np.int64)
        tr = t.t_row
        a = np.where(t.t_a == 1, cin[:, tr], 1)
        b = np.where(t.t_b == 1, cout[:, tr], 1)
        vals = (t.t_num * a * b // t.t_den).astype(np.float64)
        q = np.asarray((self.A.T @ vals.T).T).reshape(K, n, NQ)
        wb = (q[:, :, QI["params"]] * s.wbytes + q[:, :, QI["buffers"]] * s.bbytes) * s.wscale \
            + q[:, :, QI["fixed_bytes"]] * s.fixed_scale + s.extra_per_cout * cout + s.extra_const
        # activations: a row writes in its own activation dtype and reads in its producers' (approximated by its own)
        arb = q[:, :, QI["act_in"]] * s.abytes
        awb = q[:, :, QI["act_out"]] * s.abytes
        # peak: storages sized by their channels and the producer's activation dtype, alive from birth to death
        sch = t.st_chan0[None, :] - (P @ self.Mst).round()
        live = np.cumsum((t.st_elems_per_chan * sch * self.prod_bytes) @ self.B, axis=1)
        peak = np.floor(live.max(1)) if live.shape[1] else np.zeros(K)
        return Evaluated(cin, cout, q, wb, arb, awb, peak)


def evaluate(table: LayerTable) -> Evaluated:
    """The table's own state: the Evaluator's K = 1 case."""
    return Evaluator(table)(table.state.kept).one()


METRICS = ("params", "size_bytes", "macs", "flops", "memory_access_bytes", "peak_memory_bytes")


def metric_totals(ev: Evaluated, batch: int) -> dict[str, np.ndarray]:
    """Every metric of K evaluated candidates (arrays of K), per sample of a traced `batch`."""
    qs = ev.q.sum(1)
    size = ev.weight_bytes.sum(1)
    macs = qs[:, QI["macs"]] / batch
    return {"params": np.round(qs[:, QI["params"]]), "size_bytes": np.round(size), "macs": macs, "flops": 2 * macs,
            "gemm_macs": np.round(qs[:, QI["gemm_macs"]] / batch),
            "memory_access_bytes": np.round(size + ev.act_read_bytes.sum(1) + ev.act_write_bytes.sum(1)),
            "peak_memory_bytes": np.round(size + ev.peak_act_bytes)}


def _number(v: float) -> int | float:
    return int(round(v)) if float(v).is_integer() else float(v)


def totals(table: LayerTable, ev: Evaluated | None = None) -> dict[str, Any]:
    """The table's metrics (metric_totals' K = 1 case): counts and bytes as integers, MACs too where whole."""
    ev = ev or evaluate(table)
    many = Evaluated(ev.cin[None], ev.cout[None], ev.q[None], ev.weight_bytes[None], ev.act_read_bytes[None],
                     ev.act_write_bytes[None], np.array([ev.peak_act_bytes]))
    m = {k: float(v[0]) for k, v in metric_totals(many, table.batch).items()}
    return {k: _number(v) if k in ("macs", "flops") else int(v) for k, v in m.items()}


def layer_rows(table: LayerTable, ev: Evaluated | None = None) -> list[dict[str, Any]]:
    ev = ev or evaluate(table)
    out = []
    for i in range(table.n):
        out.append({
            "name": table.names[i], "op": table.ops[i], "kind": table.kinds[i],
            "input_shapes": [list(s) for s in table.in_shapes[i]], "output_shapes": [list(s) for s in table.out_shapes[i]],
            "in_channels": int(ev.cin[i]), "out_channels": int(ev.cout[i]),
            "params": int(ev.q[i, QI["params"]]), "macs": float(ev.q[i, QI["macs"]]),
            "gemm_macs": int(ev.q[i, QI["gemm_macs"]]),
            "weight_bytes": int(round(ev.weight_bytes[i])), "weight_dtype": table.state.wdtype[i],
            "act_read_bytes": int(ev.act_read_bytes[i]), "act_write_bytes": int(ev.act_write_bytes[i]),
        })
    return out
