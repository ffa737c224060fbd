"""List the registered models (exits, grids, parameters, GFLOPs per exit); optionally run one.

usage: python scripts/list_models.py [--run NAME] [--batch N] [--device_target CPU|GPU|Ascend]

MindSpore logs errors only (GLOG_v=3), so its warnings (building models without weights warns per tensor)
do not interleave with the table; set GLOG_v=2 to see them.
"""

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("GLOG_v", "3")  # read by MindSpore when it is imported

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402

from src.engine.evaluate import softmax  # noqa: E402
from src.flops import exit_gflops  # noqa: E402
from src.models import create_model, list_models, model_spec  # noqa: E402
from src.models.weights import spec_parameter_shapes  # noqa: E402


def parameter_count(spec) -> int:
    return sum(math.prod(shape) for shape in spec_parameter_shapes(spec).values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", metavar="NAME", help="compile NAME in graph mode and run a forward on random images")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device_target", default="CPU", choices=["CPU", "GPU", "Ascend"])
    args = parser.parse_args(argv)
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device(args.device_target)

    print(f"{'model':<16} {'grids':<12} {'img':>4} {'params':>12}  cumulative GFLOPs per exit")
    for name in list_models():
        spec = model_spec(name)
        grids = "/".join(str(g) for g in spec.grids)
        gflops = " / ".join(f"{g:.4g}" for g in exit_gflops(spec))
        print(f"{name:<16} {grids:<12} {spec.img_size:>4} {parameter_count(spec):>12,}  {gflops}")

    if args.run:
        try:
            net = create_model(args.run)
        except ValueError as err:
            print(f"list_models.py: error: {err}", file=sys.stderr)
            return 1
        net.set_train(False)
        spec = net.spec
        images = ms.Tensor(np.random.default_rng(0).normal(
            size=(args.batch, spec.in_chans, spec.img_size, spec.img_size)).astype(np.float32))
        start = time.perf_counter()
        net(images)
        compiled = time.perf_counter() - start
        start = time.perf_counter()
        outputs = net(images)
        ran = time.perf_counter() - start
        print(f"\n{args.run}: compiled and ran in {compiled:.1f} s; "
              f"a second batch of {args.batch} took {ran * 1e3:.0f} ms")
        for k, logits in enumerate(outputs):
            probs = softmax(logits.asnumpy())
            print(f"  exit {k + 1} ({spec.grids[k]}x{spec.grids[k]} tokens): logits {tuple(logits.shape)}, "
                  f"mean max-softmax {probs.max(1).mean():.3f} (untrained weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
