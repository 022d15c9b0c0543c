"""Property-based tests (hypothesis) of what users type: strategy strings and requirement values either parse
into something valid or end in one clean UserInputError, never another exception."""
from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from estimators.errors import UserInputError
from estimators.strategy import check_executable, parse_strategy
from search.requirements import LIMITS, parse_requirements

TOKENS = ["prune", "quantize", "distill", "int8", "fp16", "bf16", "int8-weight-only", "global", "uniform", "width",
          "round_to=8", "round_to=x", "layers=conv=0.5", "tolerable_loss=0.01", "0.5", "1.5", "-0.1", "nan", "inf",
          "", ":", ",", "{", "}", "\"steps\"", "torchvision:resnet18"]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_any_text_parses_or_is_one_clean_error(text):
    try:
        s = parse_strategy(text)
    except UserInputError as exc:
        assert str(exc).strip()
        return
    assert parse_strategy(s.compact()).compact() == s.compact()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=4).map(":".join), min_size=1, max_size=3)
       .map(",".join))
def test_strategy_like_text_parses_or_is_one_clean_error(text):
    try:
        s = parse_strategy(text)
    except UserInputError:
        return
    # what parses round-trips through its compact form, and apply's own check refuses or accepts it cleanly
    assert parse_strategy(s.compact()) == s
    for has_data in (False, True):
        try:
            check_executable(s, has_data)
        except UserInputError:
            pass
    for step in s.steps:
        if step.method == "prune":
            assert 0 <= step.ratio < 1 and all(0 <= r < 1 for r in (step.layers or {}).values())


NUMBERS = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10**12),
                    st.sampled_from(["nan", "inf", "-1", "1e3", "x", ""]))


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({k: NUMBERS for k in LIMITS}))
def test_requirement_values_are_finite_and_positive_or_refused(values):
    try:
        req = parse_requirements(values)
    except UserInputError as exc:
        assert str(exc).startswith("invalid requirements")
        return
    for name, limit in req.active().items():
        assert math.isfinite(limit) and (limit > 0 or (name == "max_accuracy_drop" and limit >= 0)), (name, limit)
