"""Early-exit throughput against running every exit and against the last exit's plain backbone.

usage: python benchmarks/bench_adaptive.py [--model dvt_t2t_vit_12] [--batch 64] [--rounds 3] [--micro_batch 16]
                                           [--reference_batch 32] [--fractions 0.6,0.3,0.1 0.4,0.35,0.25 ...]

One process, one batch of random images, rounds alternating between the contenders so machine noise hits
all of them. Each scenario is a share of images leaving at each exit; its thresholds are set on the batch's
own confidences to give exactly those shares (random weights have no meaningful confidence, so shares are
the honest knob). Running every exit is timed twice: the plain network over the batch in pieces of
--reference_batch (MindSpore's CPU graphs hold every intermediate, about 0.3 GB per image for T2T-ViT-12, so
a whole batch of 64 would not fit beside the other graphs), and the early-exit cascade with no early exit.
The measured speedup is over the faster of the two. Prints images/s, measured and FLOPs-predicted speedups,
and the compile times (kept out of the steady-state figures). The predictions are for the shares the batch
realises (a whole number of images per exit: 0.6 / 0.3 / 0.1 of 64 is 38 / 19 / 7), printed beside the asked-for
ones. Two predictions: by the paper's FLOPs per exit, and
by the FLOPs this implementation executes (`exit_gflops(executed=True)`: the last stage's last block computes the
cls token alone, which makes running every exit cheaper than the paper's count, and the paper's prediction too
high by that much).
"""

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402

from src.budget import NEVER  # noqa: E402
from src.engine.adaptive import AdaptiveCascade  # noqa: E402
from src.engine.evaluate import softmax  # noqa: E402
from src.flops import exit_gflops  # noqa: E402
from src.models import create_model  # noqa: E402


def thresholds_for_shares(conf: np.ndarray, shares: list[float]) -> list[float]:
    """Thresholds that send exactly `shares` of the batch out at exits 1..K-1 (the rest at K), each midway between
    two confidences, so that another runtime's rounding of the same model cannot move an image across."""
    left = np.ones(conf.shape[1], bool)
    thresholds = []
    for k, share in enumerate(shares[:-1]):
        want = int(round(share * conf.shape[1]))
        candidates = np.sort(conf[k][left])[::-1]
        if want == 0:
            threshold = NEVER
        else:
            below = candidates[want] if want < len(candidates) else 0.0
            threshold = float(candidates[want - 1] + below) / 2
        thresholds.append(threshold)
        left &= ~(conf[k] >= threshold)
    return thresholds + [0.0]


def timed(fn, rounds_log: list[float]) -> None:
    start = time.perf_counter()
    fn()
    rounds_log.append(time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dvt_t2t_vit_12")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--micro_batch", type=int, default=16, help="the cascade's static graph size; 0: dynamic")
    parser.add_argument("--reference_batch", type=int, default=32, help="piece size for the plain networks")
    parser.add_argument("--fractions", nargs="+", default=["0.6,0.3,0.1", "0.4,0.35,0.25", "0.2,0.3,0.5"])
    args = parser.parse_args(argv)
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    net = create_model(args.model, drop_path_rate=0.0)
    net.set_train(False)
    spec = net.spec
    backbone = create_model(args.model, grids=(spec.grids[-1],), drop_path_rate=0.0)  # the last exit alone
    backbone.set_train(False)
    images = ms.Tensor(np.random.default_rng(0).normal(
        size=(args.batch, spec.in_chans, spec.img_size, spec.img_size)).astype(np.float32))
    flops = np.array(exit_gflops(spec))
    executed = np.array(exit_gflops(spec, executed=True))

    pieces = [images[i:i + args.reference_batch] for i in range(0, args.batch, args.reference_batch)]

    def run_plain(network) -> np.ndarray:
        return np.concatenate([network(piece)[-1].asnumpy() for piece in pieces])

    compile_log = []
    start = time.perf_counter()
    per_piece = [[logits.asnumpy() for logits in net(piece)] for piece in pieces]  # one pass over the batch
    conf = np.stack([softmax(np.concatenate(exit_logits)).max(1) for exit_logits in zip(*per_piece, strict=True)])
    compile_log.append(("all exits", time.perf_counter() - start))
    start = time.perf_counter()
    run_plain(backbone)
    compile_log.append(("backbone", time.perf_counter() - start))
    cascade = AdaptiveCascade(net, micro_batch=args.micro_batch)
    scenarios = [[float(x) for x in text.split(",")] for text in args.fractions]
    no_exit = [NEVER] * (len(flops) - 1) + [0.0]
    scenario_thresholds = [thresholds_for_shares(conf, shares) for shares in scenarios]
    start = time.perf_counter()
    cascade.set_thresholds(no_exit)
    cascade(images)
    realised = []  # each scenario's shares as this batch can give them (0.1 of 64 images is 7 of them, 0.109)
    for thresholds in scenario_thresholds:
        cascade.set_thresholds(thresholds)  # compiles every graph size the scenarios need
        realised.append(np.bincount(cascade(images).exits, minlength=len(flops)) / args.batch)
    mode = f"micro-batches of {args.micro_batch}" if args.micro_batch else "dynamic-batch stages"
    compile_log.append((f"{len(flops)} stages, {mode}", time.perf_counter() - start))

    times = {"all": [], "cascade": [], "backbone": []}
    times.update({i: [] for i in range(len(scenarios))})
    for _ in range(args.rounds):
        timed(lambda: run_plain(net), times["all"])
        cascade.set_thresholds(no_exit)
        timed(lambda: cascade(images), times["cascade"])
        timed(lambda: run_plain(backbone), times["backbone"])
        for i, thresholds in enumerate(scenario_thresholds):
            cascade.set_thresholds(thresholds)
            timed(lambda: cascade(images), times[i])

    def rate(key) -> float:
        return args.batch / float(np.median(times[key]))

    print(f"{args.model}, batch {args.batch}, {args.rounds} rounds, {os.cpu_count()} cores; exit GFLOPs "
          + " / ".join(f"{f:.4g}" for f in flops))
    print("compiled: " + "; ".join(f"{name} {seconds:.1f} s" for name, seconds in compile_log)
          + f"; peak memory of the process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB")
    reference = max(rate("all"), rate("cascade"))
    print(f"  all exits, plain network   {rate('all'):7.2f} img/s  (every image runs every stage, "
          f"{flops[-1]:.4g} GFLOPs; pieces of {args.reference_batch})")
    print(f"  all exits, cascade         {rate('cascade'):7.2f} img/s  (no early exit)")
    print(f"  backbone {spec.grids[-1]}x{spec.grids[-1]}             {rate('backbone'):7.2f} img/s")
    print("  exit shares          realised              img/s   GFLOPs  speedup measured  predicted  ratio  "
          "predicted, executed  ratio")
    for i, (shares, ran) in enumerate(zip(scenarios, realised, strict=True)):
        expected = float(ran @ flops)
        measured = rate(i) / reference
        predicted = flops[-1] / expected
        predicted_executed = executed[-1] / float(ran @ executed)
        print(f"  {' / '.join(f'{s:.2f}' for s in shares):<18}   {' / '.join(f'{s:.3f}' for s in ran):<20} "
              f"{rate(i):7.2f}  {expected:7.4g}  {measured:16.2f}  {predicted:9.2f}  {measured / predicted:5.2f}  "
              f"{predicted_executed:19.2f}  {measured / predicted_executed:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
