"""Many candidates at once: the estimators' arithmetic (estimators.table.evaluate and totals) over a matrix of
channel counts, one row per candidate, and their latency by the one latency model (hardware.latency.LatencyModel,
whose K = 1 case is predict_latency).

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
from hardware.latency import LatencyModel
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


class BatchEvaluator:
    """Totals and predicted latency of K candidates of one base table (student and quantization fixed)."""

    def __init__(self, table: LayerTable, profile: HardwareProfile | None, batch: int = 1, anchor=None):
        """`anchor`: a hardware.anchor.Anchor of the original model on this target: every candidate's latency is
        corrected by it (hardware.latency.predict_latency does the same for one)."""
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
        self.latency = LatencyModel(t, profile, batch) if profile is not None else None
        self.anchor = anchor
        self.correction = anchor.correction(t, self.latency) if anchor is not None and profile is not None else None

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
        if self.latency is not None:
            rows, outside = self.latency.seconds(q, cin, cout, wb, arb, awb)
            if self.correction is not None:
                rows, outside = self.correction.apply(rows, outside)
            out["latency_ms"] = (rows.sum(1) + outside) * 1e3
        return out
