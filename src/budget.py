"""Early-exit thresholds under a compute budget (paper Eq. 10), for any number of exits.

A sample leaves at the first exit k whose top softmax probability reaches threshold T_k (the last
threshold is 0: everything left exits there). Given every exit's probabilities on calibration data and
the cumulative GFLOPs of each exit, a solver picks thresholds that maximise accuracy subject to expected
GFLOPs <= budget:
- `ga`: a seeded genetic algorithm, the paper's method, with a final coordinate polish;
- `geometric`: the official code's heuristic (exit proportions proportional to q, q^2, q^3, ...);
- `exhaustive`: exact for two exits, every point of the threshold grid for more.

`ga` and `exhaustive` search thresholds on a grid of per-exit confidence quantiles (exact, every distinct
value, for two exits). On that grid any policy is scored in O(1) from prefix sums of a (K-1)-dimensional
histogram, which is what lets a whole population, or every grid point, be scored at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEVER = 1e8  # a threshold no probability reaches: nobody exits there (the official code's value)
OFFICIAL_BUDGETS = 59  # p = 1..59, q = p / 20
GRID_CELLS = 2 ** 21  # histogram cells at most: 1449 levels per exit for 3 exits, 128 for 4


class BudgetError(ValueError):
    """A budget no policy can meet, or inputs that do not fit together."""


@dataclass
class Policy:
    """Thresholds and what they give on some data."""

    thresholds: list[float]
    top1: float  # %
    expected_gflops: float
    exit_fractions: list[float]

    def as_dict(self, budget: float) -> dict:
        return {"budget_gflops": budget, "expected_gflops": self.expected_gflops, "top1": self.top1,
                "exit_fractions": self.exit_fractions, "thresholds": self.thresholds}


def confidences(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) top probability and (K, N) correctness of every exit, from (K, N, C) probabilities."""
    probs = np.asarray(probs)
    if probs.ndim != 3 or probs.shape[1] != len(labels):
        raise BudgetError(f"probabilities must be (exits, samples, classes) for {len(labels)} labels, "
                          f"got {probs.shape}")
    return probs.max(-1), probs.argmax(-1) == np.asarray(labels)[None, :]


def simulate(thresholds, conf: np.ndarray, correct: np.ndarray, flops) -> Policy:
    """Exact result of a threshold policy on every sample."""
    num_exits, num = conf.shape
    thresholds = [float(t) for t in thresholds]
    left = np.ones(num, bool)
    exit_at = np.full(num, num_exits - 1)
    for k in range(num_exits - 1):
        leaving = left & (conf[k] >= thresholds[k])
        exit_at[leaving] = k
        left &= ~leaving
    fractions = np.bincount(exit_at, minlength=num_exits) / num
    top1 = 100.0 * correct[exit_at, np.arange(num)].mean()
    return Policy(thresholds, float(top1), float(fractions @ np.asarray(flops, float)), fractions.tolist())


def geometric_thresholds(conf: np.ndarray, q: float) -> list[float]:
    """The official heuristic: exit k takes a share q^k / sum_j q^j of the samples, most confident first.

    Walking the not-yet-exited samples of exit k in descending confidence, T_k is the confidence of the
    sample at which their count reaches floor(n * share_k); if it never does, nobody exits at k.
    """
    num_exits, num = conf.shape
    shares = q ** np.arange(1, num_exits + 1, dtype=np.float64)
    shares /= shares.sum()
    left = np.ones(num, bool)
    thresholds = []
    for k in range(num_exits - 1):
        target = int(np.floor(num * shares[k]))
        order = np.argsort(-conf[k], kind="stable")
        counted = np.cumsum(left[order])
        reached = np.nonzero(counted >= target)[0] if target > 0 else np.array([], int)
        threshold = float(conf[k][order[reached[0]]]) if len(reached) else NEVER
        thresholds.append(threshold)
        left &= ~(conf[k] >= threshold)
    return thresholds + [0.0]


def official_budgets(conf: np.ndarray, correct: np.ndarray, flops) -> list[float]:
    """The 59 budgets of the official protocol: the expected GFLOPs of q = p/20, p = 1..59, on this data."""
    return [simulate(geometric_thresholds(conf, p / 20), conf, correct, flops).expected_gflops
            for p in range(1, OFFICIAL_BUDGETS + 1)]


class ThresholdGrid:
    """Per-exit threshold levels and prefix sums that score any policy on them in O(1).

    Level j of exit k is threshold levels[k][j] (j = len: nobody exits). Samples are binned by the level
    they reach on exits 1..K-1; prefix sums of the counts, and of the correct counts at each exit, give
    how many exit where, and how many of those are right, for any index vector.
    """

    def __init__(self, conf: np.ndarray, correct: np.ndarray, flops, max_cells: int = GRID_CELLS):
        num_exits, num = conf.shape
        if num_exits < 2:
            raise BudgetError("thresholds need at least two exits")
        self.num_exits, self.num = num_exits, num
        self.flops = np.asarray(flops, np.float64)
        axes = num_exits - 1
        per_axis = max(2, int(round(max_cells ** (1.0 / axes))) - 1)
        self.levels, bins = [], []
        for k in range(axes):
            values = np.unique(conf[k])
            if len(values) > per_axis:
                values = np.unique(np.quantile(conf[k], np.linspace(0, 1, per_axis, endpoint=False),
                                               method="inverted_cdf"))
            self.levels.append(values)
            bins.append(np.searchsorted(values, conf[k], side="right"))  # levels reached: conf >= values[:b]
        self.sizes = [len(v) + 1 for v in self.levels]
        shape = tuple(self.sizes)
        flat = np.ravel_multi_index(tuple(bins), shape)
        exits_correct = [np.bincount(flat, weights=correct[k].astype(np.float64), minlength=int(np.prod(shape)))
                         for k in range(num_exits)]
        counts = np.bincount(flat, minlength=int(np.prod(shape))).astype(np.float64)
        self.count_prefix = self._prefix(counts.reshape(shape))
        self.correct_prefix = [self._prefix(c.reshape(shape)) for c in exits_correct]

    @staticmethod
    def _prefix(array: np.ndarray) -> np.ndarray:
        """P[i1..im] = sum over bins b < i on every axis (zero-padded in front)."""
        out = np.pad(array, [(1, 0)] * array.ndim)
        for axis in range(array.ndim):
            out = np.cumsum(out, axis=axis)
        return out

    def _region(self, prefix: np.ndarray, index: np.ndarray, stage: int) -> np.ndarray:
        """Sum over the samples that exit at `stage` under level indices `index` (P, K-1).

        A sample's bin on axis k counts the levels its confidence reaches, so it exits at k when
        bin_k > j_k and stays when bin_k < j_k + 1: exits < stage below, exit `stage` not below.
        """
        full = np.array(self.sizes)
        below = np.tile(full, (len(index), 1))  # (P, axes): upper bounds (exclusive) of the region per axis
        below[:, :stage] = index[:, :stage] + 1
        region = prefix[tuple(below.T)]
        if stage < self.num_exits - 1:
            below[:, stage] = index[:, stage] + 1
            region = region - prefix[tuple(below.T)]
        return region

    def score(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For (P, K-1) level indices: accuracy (fraction), expected GFLOPs, (P, K) exit fractions."""
        index = np.atleast_2d(index)
        counts = np.stack([self._region(self.count_prefix, index, k) for k in range(self.num_exits)], 1)
        correct = sum(self._region(self.correct_prefix[k], index, k) for k in range(self.num_exits))
        fractions = counts / self.num
        return correct / self.num, fractions @ self.flops, fractions

    def thresholds(self, index) -> list[float]:
        out = []
        for k, j in enumerate(np.asarray(index).ravel()):
            out.append(float(self.levels[k][j]) if j < len(self.levels[k]) else NEVER)
        return out + [0.0]

    def index_of(self, thresholds) -> np.ndarray:
        """Grid indices of thresholds (the first level at or above each)."""
        return np.array([np.searchsorted(self.levels[k], t, side="left") for k, t in enumerate(thresholds[:-1])])


def _check_budget(budget: float, flops) -> None:
    if budget < flops[0] - 1e-12:
        raise BudgetError(f"a budget of {budget:.4g} GFLOPs is below the first exit's cost {flops[0]:.4g}: "
                          "no policy can meet it")


def solve_exhaustive(grid: ThresholdGrid, budget: float, chunk: int = 1 << 18) -> np.ndarray:
    """The best grid policy within the budget, scoring every grid point (exact for two exits)."""
    _check_budget(budget, grid.flops)
    total = int(np.prod([len(v) + 1 for v in grid.levels]))
    best, best_index = -1.0, None
    for start in range(0, total, chunk):
        flat = np.arange(start, min(start + chunk, total))
        index = np.stack(np.unravel_index(flat, [len(v) + 1 for v in grid.levels]), 1)
        acc, gflops, _ = grid.score(index)
        acc = np.where(gflops <= budget + 1e-12, acc, -1.0)
        i = int(acc.argmax())
        if acc[i] > best:
            best, best_index = float(acc[i]), index[i]
    return best_index


def _fitness(grid: ThresholdGrid, index: np.ndarray, budget: float) -> np.ndarray:
    """Accuracy for policies within the budget; below every feasible one, minus the overshoot, otherwise."""
    acc, gflops, _ = grid.score(index)
    return np.where(gflops <= budget + 1e-12, acc, -1.0 - (gflops - budget))


def solve_ga(grid: ThresholdGrid, budget: float, seed: int = 0, population: int = 128, generations: int = 120,
             seeds: list[np.ndarray] | None = None) -> np.ndarray:
    """A genetic search over grid level indices, then a coordinate polish of the best policy.

    Tournament selection (3), uniform crossover, Gaussian mutation on the normalised level, 4 elites.
    `seeds` (for instance the geometric policies) join the random initial population.
    """
    _check_budget(budget, grid.flops)
    rng = np.random.default_rng(seed)
    top = np.array([len(v) for v in grid.levels])  # index == top: nobody exits there
    pop = rng.integers(0, top + 1, size=(population, len(top)))
    pop[0] = top  # everything to the last exit
    pop[1] = 0  # everything at the first exit: feasible for any valid budget
    if seeds:
        extra = np.array(seeds[: population // 8])
        pop[2:2 + len(extra)] = extra
    fit = _fitness(grid, pop, budget)
    for generation in range(generations):
        order = np.argsort(-fit)
        elites = pop[order[:4]]
        contenders = rng.integers(0, population, size=(2, population, 3))
        parents = [pop[c[np.arange(population), fit[c].argmax(1)]] for c in contenders]
        mask = rng.random(pop.shape) < 0.5
        children = np.where(mask, parents[0], parents[1]).astype(np.float64)
        sigma = 0.15 * (1 - generation / generations) + 0.01
        mutate = rng.random(pop.shape) < 0.3
        children += mutate * rng.normal(0, sigma, pop.shape) * (top + 1)
        children = np.clip(np.rint(children), 0, top).astype(int)
        children[:4] = elites
        pop, fit = children, _fitness(grid, children, budget)
    finalists = [_polish(grid, pop[i], budget) for i in np.argsort(-fit)[:6]]
    return max(finalists, key=lambda index: float(_fitness(grid, index, budget)[0]))


def _polish(grid: ThresholdGrid, index: np.ndarray, budget: float) -> np.ndarray:
    """Coordinate ascent: move one threshold at a time to its best feasible level, until nothing improves."""
    index = index.copy()
    best = float(_fitness(grid, index, budget)[0])
    improved = True
    while improved:
        improved = False
        for axis, levels in enumerate(grid.levels):
            candidates = np.tile(index, (len(levels) + 1, 1))
            candidates[:, axis] = np.arange(len(levels) + 1)
            fit = _fitness(grid, candidates, budget)
            i = int(fit.argmax())
            if fit[i] > best + 1e-15:
                best, index, improved = float(fit[i]), candidates[i], True
    return index


GEOMETRIC_QS = np.linspace(0.05, 2.95, 291)  # a fine grid around the official q = p/20, p = 1..59


def geometric_curve(conf: np.ndarray, correct: np.ndarray, flops, qs=GEOMETRIC_QS) -> list[Policy]:
    """The official heuristic's policies over a fine grid of q, each scored on the data."""
    return [simulate(geometric_thresholds(conf, float(q)), conf, correct, flops) for q in qs]


def best_within(policies: list[Policy], budget: float) -> Policy | None:
    feasible = [p for p in policies if p.expected_gflops <= budget + 1e-12]
    return max(feasible, key=lambda p: p.top1) if feasible else None


METHODS = ("ga", "geometric", "exhaustive")


def solve(method: str, calib_probs: np.ndarray, calib_labels: np.ndarray, flops, budgets,
          seed: int = 0) -> list[list[float]]:
    """Thresholds for each budget (GFLOPs), solved on calibration data with `method`.

    The GA's first population holds the geometric policies, and it keeps the best policy it has seen,
    so on the calibration data it is never below the heuristic it is compared with.
    """
    if method not in METHODS:
        raise BudgetError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    conf, correct = confidences(calib_probs, calib_labels)
    if len(flops) != conf.shape[0]:
        raise BudgetError(f"{len(flops)} exit costs given for {conf.shape[0]} exits")
    for budget in budgets:
        _check_budget(budget, flops)
    everyone_first = [0.0] * conf.shape[0]
    if method == "exhaustive":
        grid = ThresholdGrid(conf, correct, flops)
        return [grid.thresholds(solve_exhaustive(grid, b)) for b in budgets]
    curve = geometric_curve(conf, correct, flops)
    if method == "geometric":
        return [(best_within(curve, b) or simulate(everyone_first, conf, correct, flops)).thresholds
                for b in budgets]
    grid = ThresholdGrid(conf, correct, flops)
    seeds = [grid.index_of(policy.thresholds) for policy in curve[::30]]
    out = []
    for budget in budgets:
        found = simulate(grid.thresholds(solve_ga(grid, budget, seed=seed, seeds=seeds)), conf, correct, flops)
        heuristic = best_within(curve, budget)
        if found.expected_gflops > budget + 1e-12 or (heuristic is not None and heuristic.top1 > found.top1):
            found = heuristic or simulate(everyone_first, conf, correct, flops)
        out.append(found)
    return [policy.thresholds for policy in _monotone(out, budgets)]


def _monotone(policies: list[Policy], budgets) -> list[Policy]:
    """A policy found for a smaller budget is feasible for a larger one: keep the best feasible for each."""
    return [max((p for p in policies if p.expected_gflops <= budget + 1e-12), key=lambda p: p.top1)
            for budget in budgets]


def resolve_budgets(spec: str, flops, conf: np.ndarray | None = None, correct: np.ndarray | None = None) -> list[float]:
    """Budgets in GFLOPs from 'official' (the 59 of the official protocol, on the calibration data),
    a comma list of GFLOPs ('1.2,2.0'), or of fractions of the last exit's cost ('0.3x,0.5x')."""
    spec = spec.strip()
    if spec == "official":
        if conf is None:
            raise BudgetError("'official' budgets are measured on calibration data")
        return official_budgets(conf, correct, flops)
    budgets = []
    for part in spec.split(","):
        part = part.strip()
        try:
            value = read_gflops(part[:-1], "budget") * flops[-1] if part.endswith("x") else read_gflops(part, "budget")
        except BudgetError:
            raise BudgetError(f"cannot read budget {part!r}: give positive GFLOPs (1.5), a fraction of the last "
                              "exit (0.4x) or 'official'") from None
        _check_budget(value, flops)
        budgets.append(value)
    return budgets


def read_gflops(text: str, flag: str) -> float:
    """A budget in GFLOPs from text: a positive finite number, else a BudgetError naming `flag` and the text."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = float("nan")
    if not np.isfinite(value) or value <= 0:
        raise BudgetError(f"{flag} must be a positive number of GFLOPs, not {text!r}")
    return value
