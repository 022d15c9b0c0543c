"""The compression methods are found through their one registration (estimators.methods.METHODS): the strategy's
JSON and string forms, the estimate and the executor all dispatch through it."""
import pytest

from estimators.analyze import analyze
from estimators.compress import estimate
from estimators.methods import METHODS
from estimators.modelspec import load_model
from estimators.strategy import STRATEGY_FORMS, Strategy, parse_strategy
from estimators.table import totals

EXAMPLES = {"prune": "prune:0.3:global:round_to=2", "quantize": "quantize:int8:keep_float=classifier",
            "distill": "distill:width:0.5"}


def test_every_registered_method_has_an_example_here():
    from estimators.methods import NAMES

    assert list(METHODS) == list(NAMES)  # each module's METHOD is named as its module
    assert set(METHODS) == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_a_method_parses_round_trips_and_is_documented(name):
    m = METHODS[name]
    s = parse_strategy(EXAMPLES[name])
    assert type(s.steps[0]) is m.step and s.compact() == EXAMPLES[name]
    assert Strategy.model_validate(s.model_dump()) == s  # the JSON form
    assert m.forms in STRATEGY_FORMS


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_estimate_is_the_methods_own(name):
    table = analyze(load_model("demo:digits-cnn"))
    step = parse_strategy(EXAMPLES[name]).steps[0]
    assert totals(estimate(table, Strategy(steps=[step]))) == totals(METHODS[name].estimate(table, step))


def test_an_unknown_method_lists_the_registered_ones():
    from estimators.errors import UserInputError

    with pytest.raises(UserInputError, match="methods are prune, quantize, distill"):
        parse_strategy("sparsify:0.5")


def test_a_change_in_a_method_module_invalidates_cached_results(tmp_path, monkeypatch):
    """The pipeline's caches (analysis, sensitivity, execution) are keyed by the code's hash: the methods live in a
    subpackage of estimators, and a change there must change the key."""
    import tasks.pipeline as tp

    (tmp_path / "estimators" / "methods").mkdir(parents=True)
    (tmp_path / "estimators" / "table.py").write_text("A = 1\n")
    method = tmp_path / "estimators" / "methods" / "prune.py"
    method.write_text("B = 1\n")
    monkeypatch.setattr(tp, "CODE_ROOT", tmp_path)
    before = tp._code_version("estimators")
    method.write_text("B = 2\n")
    assert tp._code_version("estimators") != before
