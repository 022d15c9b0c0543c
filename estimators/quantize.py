"""Quantization estimator (rule filled in from the executor's verified storage layout)."""
from __future__ import annotations
