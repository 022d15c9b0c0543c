"""NSGA-II (Deb, Pratap, Agarwal and Meyarivan, 2002) over bounded integer genomes, as array arithmetic.

The search evaluates a whole generation in one call of the batch evaluator (search.batch), so the genetic
algorithm's own bookkeeping is what bounds its speed: a population of objects per individual (as general-purpose
libraries keep) costs more than evaluating the candidates. Here a generation is a few arrays: non-dominated ranks
from a domination matrix, crowding distances per front, binary tournaments, simulated binary crossover and
polynomial mutation (both rounded to the integer grid), duplicates dropped by their bytes.

Constraints follow Deb's rules: a candidate meeting every constraint beats one that does not; of two that do not,
the smaller total violation wins; of two that do, the lower front, then the larger crowding distance.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

Evaluate = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # genomes (N x V) -> (objectives N x M, G N x C)

CROSSOVER_PROB = 0.9  # a mating's chance of crossing over (else the children copy their parents)
CROSSOVER_ETA = 3.0  # spread of simulated binary crossover: low, children far from their parents
MUTATION_ETA = 3.0  # spread of polynomial mutation
MAX_TRIES = 100  # matings per generation retried while duplicates leave it short


def nondominated_ranks(F: np.ndarray) -> np.ndarray:
    """Every row's front (0: no row dominates it; k: only rows of fronts below k do), objectives minimised."""
    n = len(F)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    no_worse = np.ones((n, n), dtype=bool)
    better = np.zeros((n, n), dtype=bool)
    for f in F.T:  # objective by objective: n x n comparisons, no n x n x M arrays
        no_worse &= f[:, None] <= f[None, :]
        better |= f[:, None] < f[None, :]
    dominates = no_worse & better
    left = dominates.sum(0)  # rows dominating each row, not yet ranked
    rank = np.full(n, -1, dtype=np.int64)
    front, r = np.flatnonzero(left == 0), 0
    while len(front):
        rank[front] = r
        left = left - dominates[front].sum(0)
        left[rank >= 0] = -1
        front, r = np.flatnonzero(left == 0), r + 1
    return rank


def crowding(F: np.ndarray) -> np.ndarray:
    """Crowding distance of the rows of one front: per objective, the normalised gap between each row's
    neighbours, summed; the extremes infinite, so they are kept first."""
    n, m = F.shape
    if n <= 2:
        return np.full(n, np.inf)
    out = np.zeros(n)
    for j in range(m):
        order = np.argsort(F[:, j], kind="stable")
        f = F[order, j]
        span = f[-1] - f[0]
        gap = np.zeros(n)
        gap[0] = gap[-1] = np.inf
        if span > 0:
            gap[1:-1] = (f[2:] - f[:-2]) / span
        out[order] += gap
    return out


def survive(F: np.ndarray, cv: np.ndarray, n: int, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The `n` survivors of a population (indices), and every row's front and crowding distance: feasible rows
    (cv == 0) front by front, the last front cut by crowding (ties at random); then infeasible rows by violation."""
    rank = np.full(len(F), np.iinfo(np.int64).max, dtype=np.int64)
    crowd = np.zeros(len(F))
    feasible = np.flatnonzero(cv <= 0)
    chosen: list[np.ndarray] = []
    need = n
    if len(feasible):
        r = nondominated_ranks(F[feasible])
        rank[feasible] = r
        for k in range(int(r.max()) + 1):
            members = feasible[r == k]
            crowd[members] = crowding(F[members])
            if need <= 0:
                continue
            if len(members) <= need:
                chosen.append(members)
                need -= len(members)
            else:  # the most spread out first; equal distances in random order
                tie = rng.random(len(members))
                chosen.append(members[np.lexsort((tie, -crowd[members]))[:need]])
                need = 0
    if need > 0:
        infeasible = np.flatnonzero(cv > 0)
        chosen.append(infeasible[np.argsort(cv[infeasible], kind="stable")[:need]])
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64), rank, crowd


def tournament(cv: np.ndarray, rank: np.ndarray, crowd: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` parents, each the winner of a binary tournament between two random rows (Deb's rules)."""
    a, b = rng.integers(0, len(cv), n), rng.integers(0, len(cv), n)
    fa, fb = cv[a] <= 0, cv[b] <= 0
    a_wins = np.where(fa != fb, fa,
                      np.where(~fa, cv[a] < cv[b],
                               np.where(rank[a] != rank[b], rank[a] < rank[b],
                                        np.where(crowd[a] != crowd[b], crowd[a] > crowd[b], rng.random(n) < 0.5))))
    return np.where(a_wins, a, b)


def sbx(p1: np.ndarray, p2: np.ndarray, xl: np.ndarray, xu: np.ndarray, rng: np.random.Generator
        ) -> tuple[np.ndarray, np.ndarray]:
    """Simulated binary crossover (bounded) of parent rows `p1`, `p2`: each variable crossed with probability
    one half in a mating that crosses (CROSSOVER_PROB)."""
    x1, x2 = np.minimum(p1, p2).astype(float), np.maximum(p1, p2).astype(float)
    diff = x2 - x1
    cross = (rng.random(p1.shape) < 0.5) & (diff > 1e-12) & (rng.random((len(p1), 1)) < CROSSOVER_PROB)
    safe = np.where(diff > 1e-12, diff, 1.0)
    u = rng.random(p1.shape)
    e = CROSSOVER_ETA + 1.0

    def beta_q(beta):
        alpha = 2.0 - beta ** -e
        return np.where(u <= 1.0 / alpha, (u * alpha) ** (1.0 / e), (1.0 / (2.0 - u * alpha)) ** (1.0 / e))

    c1 = 0.5 * (x1 + x2 - beta_q(1.0 + 2.0 * (x1 - xl) / safe) * diff)
    c2 = 0.5 * (x1 + x2 + beta_q(1.0 + 2.0 * (xu - x2) / safe) * diff)
    c1, c2 = np.clip(c1, xl, xu), np.clip(c2, xl, xu)
    swap = rng.random(p1.shape) < 0.5
    c1, c2 = np.where(swap, c2, c1), np.where(swap, c1, c2)
    return np.where(cross, c1, p1), np.where(cross, c2, p2)


def mutate(X: np.ndarray, xl: np.ndarray, xu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Polynomial mutation (bounded), each variable with probability one over their number."""
    X = X.astype(float)
    span = np.where(xu > xl, xu - xl, 1.0)
    hit = (rng.random(X.shape) < 1.0 / X.shape[1]) & (xu > xl)
    u = rng.random(X.shape)
    e = MUTATION_ETA + 1.0
    d1, d2 = (X - xl) / span, (xu - X) / span
    lo = (2 * u + (1 - 2 * u) * (1 - d1) ** e) ** (1.0 / e) - 1.0
    hi = 1.0 - (2 * (1 - u) + 2 * (u - 0.5) * (1 - d2) ** e) ** (1.0 / e)
    moved = np.clip(X + np.where(u < 0.5, lo, hi) * span, xl, xu)
    return np.where(hit, moved, X)


def _unique_new(X: np.ndarray, taken: set[bytes]) -> np.ndarray:
    """Rows of `X` not in `taken` and not repeating an earlier row (their bytes added to `taken`)."""
    keep = np.zeros(len(X), dtype=bool)
    for i, row in enumerate(X):
        key = row.tobytes()
        if key not in taken:
            taken.add(key)
            keep[i] = True
    return keep


def minimize(evaluate: Evaluate, xl: np.ndarray, xu: np.ndarray, X0: np.ndarray, pop_size: int, evals: int,
             seed: int = 0) -> int:
    """Run NSGA-II from the initial genomes `X0` (their first `pop_size` rows, duplicates dropped) until at least
    `evals` genomes were evaluated, a whole generation at a time, each generation `pop_size` children of the
    survivors (none equal to a survivor or to another child). `evaluate` returns the objectives (minimised) and
    the constraints (met where <= 0) of a block of integer genomes. Returns the genomes evaluated."""
    rng = np.random.default_rng(seed)
    xl, xu = np.asarray(xl, dtype=float), np.asarray(xu, dtype=float)
    X = np.clip(np.round(np.asarray(X0, dtype=float)), xl, xu)[:pop_size]
    X = X[_unique_new(X, set())]
    F, G = evaluate(X.astype(np.int64))
    done = len(X)
    while done < evals and len(X):
        cv = np.maximum(G, 0.0).sum(1)
        alive, rank, crowd = survive(F, cv, pop_size, rng)
        X, F, G, cv, rank, crowd = X[alive], F[alive], G[alive], cv[alive], rank[alive], crowd[alive]
        taken = {row.tobytes() for row in X}
        kids: list[np.ndarray] = []
        have = 0
        for _ in range(MAX_TRIES):
            n_pairs = (pop_size - have + 1) // 2
            p = tournament(cv, rank, crowd, 2 * n_pairs, rng)
            c1, c2 = sbx(X[p[:n_pairs]], X[p[n_pairs:]], xl, xu, rng)
            C = np.round(mutate(np.concatenate([c1, c2]), xl, xu, rng))
            C = C[_unique_new(C, taken)][:pop_size - have]
            kids.append(C)
            have += len(C)
            if have >= pop_size:
                break
        C = np.concatenate(kids)
        if not len(C):
            break
        Fc, Gc = evaluate(C.astype(np.int64))
        done += len(C)
        X, F, G = np.concatenate([X, C]), np.concatenate([F, Fc]), np.concatenate([G, Gc])
    return done
