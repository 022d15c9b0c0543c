"""search.nsga: NSGA-II's parts against an independent implementation (pymoo's non-dominated sorting) and the
whole against a problem whose Pareto front is known."""
from __future__ import annotations

import numpy as np
import pytest
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from search.nsga import crowding, minimize, nondominated_ranks, survive


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fronts_equal_pymoos_non_dominated_sorting(seed):
    rng = np.random.default_rng(seed)
    F = rng.integers(0, 6, (300, 3)).astype(float)  # coarse values: many ties and equal rows
    ranks = nondominated_ranks(F)
    for k, front in enumerate(NonDominatedSorting().do(F)):
        assert sorted(np.flatnonzero(ranks == k)) == sorted(front)
    assert (ranks >= 0).all()


def test_crowding_keeps_the_extremes_and_measures_the_gaps():
    F = np.array([[0.0, 4.0], [1.0, 3.0], [3.0, 1.0], [4.0, 0.0]])
    d = crowding(F)
    assert np.isinf(d[0]) and np.isinf(d[3])
    assert d[1] == pytest.approx(3 / 4 + 3 / 4) and d[2] == pytest.approx(3 / 4 + 3 / 4)


def test_survivors_are_feasible_first_then_least_violating():
    F = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0], [0.0, 0.0], [5.0, 5.0]])
    cv = np.array([0.0, 0.0, 0.0, 3.0, 1.0])
    alive, rank, _ = survive(F, cv, 4, np.random.default_rng(0))
    assert list(alive) == [0, 1, 2, 4]  # the dominating but infeasible row 3 last, row 4 (less violation) first
    assert list(rank[:3]) == [0, 0, 1]


def _problem(calls):
    """Minimise (x0, 20 - x0 + x1) over x in {0..20}^3 subject to x0 >= 5: the Pareto front is x1 = 0 with
    x0 in 5..20 (x2 is free), 16 objective vectors."""
    def evaluate(X):
        calls.append(X.copy())
        F = np.stack([X[:, 0], 20 - X[:, 0] + X[:, 1]], 1).astype(float)
        G = (5 - X[:, 0])[:, None].astype(float)
        return F, G
    return evaluate


def test_finds_a_known_constrained_front_within_bounds_and_reproducibly():
    calls: list[np.ndarray] = []
    X0 = np.random.default_rng(3).integers(0, 21, (40, 3))
    n = minimize(_problem(calls), np.zeros(3), np.full(3, 20), X0, 40, 2000, seed=5)
    X = np.concatenate(calls)
    assert n == len(X) >= 2000 and np.issubdtype(X.dtype, np.integer)
    assert X.min() >= 0 and X.max() <= 20
    for gen in calls:  # a generation never repeats a genome
        assert len({r.tobytes() for r in gen}) == len(gen)
    F = np.stack([X[:, 0], 20 - X[:, 0] + X[:, 1]], 1)
    ok = X[:, 0] >= 5
    found = {tuple(f) for f in F[ok][nondominated_ranks(F[ok].astype(float)) == 0]}
    assert found == {(x0, 20 - x0) for x0 in range(5, 21)}
    again: list[np.ndarray] = []
    minimize(_problem(again), np.zeros(3), np.full(3, 20), X0, 40, 2000, seed=5)
    assert all((a == b).all() for a, b in zip(calls, again)) and len(calls) == len(again)
