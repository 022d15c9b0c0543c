"""Many candidates at once: the estimators' arithmetic (estimators.table.evaluate, totals and
hardware.latency.predict_latency) over a matrix of channel counts, one row per candidate.

A search's candidates differ only in the channels each pruning group keeps, once the student (the base
table) and the quantization (its bytes per element and compute dtypes) are fixed: a `BatchEvaluator`
takes such a table and evaluates K candidates' `kept` vectors in one pass of array arithmetic, giving
exactly what the per-candidate path gives (tests/test_search.py compares them). That is what makes the
search explore tens of thousands of candidates in seconds.
"""
from __future__ import annotations

import numpy as np
from scipy import sparse

from estimators import registry as R
from estimators.table import LayerTable, NQ
from hardware.latency import (GEMM_CLASSES, conv_shape, dtype_parts, eager_terms, in_place, input_elements,
                              latency_kinds, of_class, pointwise, remainder_share, split_coefficients,
                              streamed_weights)
from hardware.profile import HardwareProfile

QI = R.Q_INDEX
CHUNK = 512  # candidates per pass (bounds the K x terms arrays)


def _dense(seg: tuple[np.ndarray, np.ndarray, np.ndarray], n_groups: int, n_cols: int) -> np.ndarray:
    """(col, group, mult) segments as a groups x cols matrix: channels lost per pruned root channel."""
    out = np.zeros((n_groups, n_cols))
    c, g, m = seg
    if len(c):
        np.add.at(out, (g, c), m)
    return out


def counts_for_ratios(table: LayerTable, ratios: np.ndarray, round_to: int | None = None) -> np.ndarray:
    """Root channels torch-pruning removes from each followed group at per-group ratios (K x groups), the
    uniform arithmetic of estimators.compress.prune_counts, vectorised over candidates."""
    groups = table.plan.groups
    gidx = np.array([g.index for g in groups], dtype=np.int64)
    chg = np.array([g.ch_groups for g in groups], dtype=np.int64)
    kept = table.state.kept[gidx].astype(np.int64)
    L = kept // chg
    r = np.atleast_2d(ratios)
    n = L - np.floor(L * (1.0 - r)).astype(np.int64)
    if round_to:
        keep = kept - n
        rounded = keep - keep % round_to
        n = np.where(n > 0, np.maximum(kept - rounded, 0), 0)
    P = n * chg
    return np.where((P >= kept) | (kept <= 1), 0, P)


class BatchEvaluator:
    """Totals and predicted latency of K candidates of one base table (student and quantization fixed)."""

    def __init__(self, table: LayerTable, profile: HardwareProfile | None, batch: int = 1):
        t = table
        self.table = t
        n = t.n
        n_dg = len(t.group_channels)
        self.n_dg = n_dg
        self.gidx = np.array([g.index for g in t.plan.groups], dtype=np.int64)
        self.Min = _dense(t.in_seg, n_dg, n)
        self.Mout = _dense(t.out_seg, n_dg, n)
        self.Mst = _dense(t.st_seg, n_dg, len(t.st_chan0))
        T = len(t.t_row)
        self.A = sparse.csr_matrix((np.ones(T), (np.arange(T), t.t_row * NQ + t.t_q)), shape=(T, n * NQ))
        s = t.state
        self.s = s
        self.prod_bytes = np.where(t.st_row >= 0, s.abytes[np.maximum(t.st_row, 0)], 4.0) / 4.0
        S = len(t.st_chan0)
        B = np.zeros((S, n + 3))
        if S:
            np.add.at(B, (np.arange(S), t.st_birth + 1), 1.0)
            np.add.at(B, (np.arange(S), t.st_death + 2), -1.0)
        self.B = B
        self.profile = profile
        self.batch = batch
        if profile is not None:
            self._latency_setup(profile, batch)

    # ------------------------------------------------------------------------------------------
    def _latency_setup(self, profile: HardwareProfile, batch: int) -> None:
        t = self.table
        self.kinds = latency_kinds(t)
        self.in_place = in_place(t, self.kinds)
        self.is_gemm = np.isin(self.kinds, GEMM_CLASSES)
        self.window = t.ksize if t.ksize is not None else np.ones(t.n)
        self.pw = pointwise(t)
        self.parts = []  # (row selection, kind, params) per dtype and class
        self.glue = []  # (rows of a dtype, seconds per activation byte written)
        call_s = 0.0
        const = np.zeros(t.n)
        for rows, eff, peak, factor, bs, classes in dtype_parts(t, self.kinds, profile, batch):
            for cls, mask in classes:
                sel = np.flatnonzero(mask)
                if eff.split:
                    coef = split_coefficients(profile, eff, cls, peak)
                    self.parts.append((sel, "split", (coef, streamed_weights(coef, profile)[4], bs, factor,
                                                      eff.eager_threads)))
                else:
                    self.parts.append((sel, "roof", (peak * eff.compute_of(cls), eff.bandwidth_of(cls), bs, factor,
                                                     eff.misaligned_factor.get(cls, 1.0), eff.kernel_overhead_us * 1e-6)))
            for cls, ns in eff.element_ns.items():
                self.parts.append((np.flatnonzero(rows & of_class(self.kinds, cls, eff.element_ns)), "element",
                                   (ns * 1e-9 * factor,)))
            for cls, ns in eff.remainder_ns.items():
                self.parts.append((np.flatnonzero(rows & of_class(self.kinds, cls, eff.remainder_ns)), "remainder",
                                   (ns * 1e-9 * factor, eff.remainder_multiple.get(cls, profile.channel_multiple or 1))))
            const[rows & (self.kinds == "view")] = eff.view_overhead_us * 1e-6
            if eff.glue_ns_per_byte:
                self.glue.append((np.flatnonzero(rows), eff.glue_ns_per_byte * 1e-9 * bs))
            call_s += eff.call_overhead_us * 1e-6 + eff.input_ns_per_element * 1e-9 * input_elements(t) * batch
        self.const_s = float(const.sum()) + call_s

    def _latency(self, q: np.ndarray, cin: np.ndarray, cout: np.ndarray, wb: np.ndarray, arb: np.ndarray,
                 awb: np.ndarray) -> np.ndarray:
        """Seconds per candidate: predict_latency's per-row model on K x rows arrays (`arb`, `awb`: activation
        bytes read and written at the traced batch)."""
        prof = self.profile
        t = self.table
        scale = self.batch / t.batch
        gemm = q[:, :, QI["gemm_macs"]] * 2 * scale
        elems = q[:, :, QI["act_out"]] * scale
        flops = np.where(self.is_gemm, gemm, np.where(self.kinds == "maxpool", elems * self.window, elems))
        awb_paid = np.where(self.in_place, 0.0, awb)  # in-place rows write back what they read (latency.in_place)
        abytes = (arb + awb_paid) * scale
        eager = {}  # per thread count: eager PyTorch's convolution dispatch columns
        m = prof.channel_multiple
        off = ((cin % m) != 0) | ((cout % m) != 0) if m and m > 1 else np.zeros(cin.shape, dtype=bool)
        cache = prof.cache_bytes or 0
        bw_dram = prof.memory_bandwidth_gbs * 1e9
        streams = (wb.sum(1) > cache)[:, None] if cache > 0 else np.zeros((len(q), 1), dtype=bool)
        total = np.zeros(len(q))
        for sel, how, par in self.parts:
            f, w, a = flops[:, sel], wb[:, sel], abytes[:, sel]
            if how == "element":
                total += (f * par[0]).sum(1)
                continue
            if how == "remainder":
                total += (f * remainder_share(cin[:, sel], par[1]) * par[0]).sum(1)
                continue
            if how == "split":
                c, c_stream, bs, factor, threads = par
                w, a = w * bs, a * bs
                hot = np.minimum(a, cache) if cache else np.zeros_like(a)
                per = c[0] + c[1] * f + c[2] * f * self.pw[sel] + c[3] * f * off[:, sel] \
                    + np.where(streams, c_stream, c[4]) * w + c[5] * hot + c[6] * (a - hot)
                if threads:
                    if threads not in eager:
                        eager[threads] = eager_terms(conv_shape(t), cin, cout, arb * scale, awb * scale, self.batch,
                                                     threads, m)
                    on, rin, wout, native, pad = (x[:, sel] for x in eager[threads])
                    per = per + c[7] * on + (c[8] * rin + c[9] * wout) * bs + (c[10] * native + c[11] * pad) * f
                per = per * factor
            else:
                peak_eff, share, bs, factor, slow_f, kern = par
                comp = f / peak_eff
                if cache:
                    work = w + a
                    cache_bw = prof.cache_bandwidth_gbs * 1e9 * share
                    act_bw = np.where(a <= cache, cache_bw, bw_dram)
                    mem_stream = (w / bw_dram + a / act_bw) * bs
                    mem_fit = work * bs / np.where(work <= cache, cache_bw, bw_dram)
                    mem = np.where(streams, mem_stream, mem_fit)
                else:
                    mem = (w + a) * bs / (bw_dram * share)
                slow = np.where(off[:, sel], slow_f, 1.0)
                body = comp * slow + mem if prof.combine == "sum" else np.maximum(comp, mem) * slow
                per = body * factor + kern
            total += per.sum(1)
        for rows, s_per_byte in self.glue:
            total += awb_paid[:, rows].sum(1) * scale * s_per_byte
        return total + self.const_s

    # ------------------------------------------------------------------------------------------
    def __call__(self, kept: np.ndarray) -> dict[str, np.ndarray]:
        """Metrics of candidates whose groups keep `kept` (K x dependency-graph groups) channels:
        params, size_bytes, macs, flops, memory_access_bytes, peak_memory_bytes and (with a profile)
        latency_ms, as arrays of K."""
        kept = np.atleast_2d(kept)
        outs = [self._chunk(kept[i:i + CHUNK]) for i in range(0, len(kept), CHUNK)]
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]} if outs else {}

    def _chunk(self, kept: np.ndarray) -> dict[str, np.ndarray]:
        t, s = self.table, self.s
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
        arb = q[:, :, QI["act_in"]] * s.abytes
        awb = q[:, :, QI["act_out"]] * s.abytes
        sch = t.st_chan0[None, :] - (P @ self.Mst).round()
        sizes = t.st_elems_per_chan * sch * self.prod_bytes
        live = np.cumsum(sizes @ self.B, axis=1)
        peak_act = np.floor(live.max(1)) if live.shape[1] else np.zeros(K)
        qs = q.sum(1)
        size = wb.sum(1)
        macs = qs[:, QI["macs"]] / t.batch
        out = {"params": np.round(qs[:, QI["params"]]), "size_bytes": np.round(size), "macs": macs, "flops": 2 * macs,
               "memory_access_bytes": np.round(size + arb.sum(1) + awb.sum(1)),
               "peak_memory_bytes": np.round(size + peak_act)}
        if self.profile is not None:
            out["latency_ms"] = self._latency(q, cin, cout, wb, arb, awb) * 1e3
        return out
