"""Many candidates at once: estimators.table.Evaluator's arithmetic over K candidates of one table (its K = 1 case
is estimators.table.evaluate) and their latency by the one latency model (hardware.latency.LatencyModel, whose
K = 1 case is predict_latency), with the anchor's correction.

A search's candidates differ only in the channels each pruning group keeps, once the student (the base
table) and the quantization (its bytes per element and compute dtypes) are fixed: a `BatchEvaluator`
takes such a table and evaluates K candidates' `kept` vectors in one pass of array arithmetic. That is what
makes the search explore tens of thousands of candidates in seconds.
"""
from __future__ import annotations

import numpy as np

from estimators.table import Evaluator, LayerTable, metric_totals
from hardware.latency import LatencyModel
from hardware.profile import HardwareProfile

CHUNK = 512  # candidates per pass (bounds the K x terms arrays)


class BatchEvaluator:
    """Totals and predicted latency of K candidates of one base table (student and quantization fixed)."""

    def __init__(self, table: LayerTable, profile: HardwareProfile | None, batch: int = 1, anchor=None):
        """`anchor`: a hardware.anchor.Anchor of the original model on this target: every candidate's latency is
        corrected by it (hardware.latency.predict_latency does the same for one)."""
        self.table = table
        self.evaluator = Evaluator(table)
        self.profile = profile
        self.batch = batch
        self.latency = LatencyModel(table, profile, batch) if profile is not None else None
        self.anchor = anchor
        self.correction = anchor.correction(table, self.latency) if anchor is not None and profile is not None else None

    # ------------------------------------------------------------------------------------------
    def __call__(self, kept: np.ndarray) -> dict[str, np.ndarray]:
        """Metrics of candidates whose groups keep `kept` (K x dependency-graph groups) channels:
        estimators.table.metric_totals' metrics and (with a profile) latency_ms, as arrays of K."""
        kept = np.atleast_2d(kept)
        outs = [self._chunk(kept[i:i + CHUNK]) for i in range(0, len(kept), CHUNK)]
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]} if outs else {}

    def _chunk(self, kept: np.ndarray) -> dict[str, np.ndarray]:
        ev = self.evaluator(kept)
        out = metric_totals(ev, self.table.batch)
        if self.latency is not None:
            rows, outside = self.latency.seconds(ev.q, ev.cin, ev.cout, ev.weight_bytes, ev.act_read_bytes,
                                                 ev.act_write_bytes)
            if self.correction is not None:
                rows, outside = self.correction.apply(rows, outside, self.latency.slow_rows(ev.cin, ev.cout))
            out["latency_ms"] = (rows.sum(1) + outside) * 1e3
        return out
