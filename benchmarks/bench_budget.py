"""Threshold solvers side by side: time and calibration accuracy of GA, geometric and exhaustive.

usage: python benchmarks/bench_budget.py [--samples 50000] [--exits 3] [--budgets official|0.3x,...]

Synthetic calibration data (tests/helpers.py's synthetic_probs); every solver sees the same data and budgets.
Prints per-solver wall time for the whole budget list and, per budget, each solver's top-1 and the GA's
gap to the exhaustive optimum.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from src.budget import METHODS, confidences, resolve_budgets, simulate, solve  # noqa: E402
from tests.helpers import synthetic_probs  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50000)
    parser.add_argument("--exits", type=int, default=3)
    parser.add_argument("--budgets", default="official")
    args = parser.parse_args(argv)
    probs, labels = synthetic_probs(args.samples, args.exits)
    flops = list(np.cumsum(np.linspace(1.0, 2.0, args.exits)))
    conf, correct = confidences(probs, labels)
    budgets = resolve_budgets(args.budgets, flops, conf, correct)
    results, seconds = {}, {}
    for method in METHODS:
        start = time.perf_counter()
        thresholds = solve(method, probs, labels, flops, budgets)
        seconds[method] = time.perf_counter() - start
        results[method] = [simulate(t, conf, correct, flops).top1 for t in thresholds]
    print(f"{args.samples} samples x {args.exits} exits, {len(budgets)} budgets, {os.cpu_count()} cores")
    for method in METHODS:
        print(f"  {method:<10} {seconds[method]:7.2f} s")
    gap = np.array(results["exhaustive"]) - np.array(results["ga"])
    above = np.array(results["ga"]) - np.array(results["geometric"])
    print(f"GA vs exhaustive: max gap {gap.max():.3f} pp, mean {gap.mean():.3f} pp; "
          f"GA vs geometric: min {above.min():+.3f} pp, mean {above.mean():+.3f} pp")
    print("budget   " + "  ".join(f"{m:>10}" for m in METHODS))
    for i, budget in enumerate(budgets):
        print(f"{budget:6.3f}   " + "  ".join(f"{results[m][i]:10.3f}" for m in METHODS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
