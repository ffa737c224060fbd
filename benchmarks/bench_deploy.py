"""Deployment speed on CPU: every exported stage and the early-exit runner, MindSpore's GraphCell vs onnxruntime.

usage: python benchmarks/bench_deploy.py [--model dvt_t2t_vit_12] [--rounds 5] [--images 16]
                                         [--fractions 0.6,0.3,0.1 0.4,0.35,0.25 0.2,0.3,0.5] [--quick]

One process. The model (random weights) is exported per stage as MindIR and as ONNX, each at a fixed batch of 1
and of 8 (src/deploy/export.py, what export.py writes), and every file is loaded as the runner loads it
(src/deploy/runner.py's load_stage and CascadeRunner), so the figures are the runner's own. Rounds alternate
between the two runtimes so machine noise hits both alike; the figure to read is the ratio of the medians,
onnxruntime / GraphCell (> 1: onnxruntime faster). Printed: each stage alone at batch 1 and 8 (ms per call,
inputs from the stage before), then the runner on --images images on the batch-1 and the batch-8 export at each
exit share: thresholds set on MindSpore's own confidences of these images (random weights carry no real
confidence: shares are the honest knob, as in bench_adaptive.py), the budget in GFLOPs per image they give, and
images/s. Compile and load time is kept out of the figures. --quick: dvt_tiny_t2t, 2 rounds, 8 images.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.bench_adaptive import thresholds_for_shares, timed  # noqa: E402
from src.deploy.export import export_cascade  # noqa: E402
from src.deploy.runner import CascadeRunner, load_stage, runtime_description  # noqa: E402
from src.engine.evaluate import softmax  # noqa: E402
from src.flops import exit_gflops  # noqa: E402
from src.models import create_model  # noqa: E402

BATCHES = (1, 8)
RUNTIMES = {"MINDIR": "mindspore", "ONNX": "onnxruntime"}  # file format -> the runner's backend


def export_all(net, folder: str, model: str) -> dict[tuple[str, int], str]:
    """Manifest path of every (format, batch) export of `net`."""
    spec = net.spec
    preprocess = {"img_size": spec.img_size, "resize": spec.img_size, "interpolation": "bicubic",
                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "layout": "NCHW",
                  "pixel_scale": 1 / 255}
    return {(fmt, b): export_cascade(net, os.path.join(folder, f"{fmt.lower()}_b{b}", model), preprocess=preprocess,
                                     batch=b, file_format=fmt, model_name=model)
            for b in BATCHES for fmt in RUNTIMES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dvt_t2t_vit_12")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=16, help="images per runner call")
    parser.add_argument("--fractions", nargs="+", default=["0.6,0.3,0.1", "0.4,0.35,0.25", "0.2,0.3,0.5"],
                        help="shares of the images leaving at each exit, one scenario each")
    parser.add_argument("--quick", action="store_true", help="dvt_tiny_t2t, 2 rounds, 8 images: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.rounds, args.images = "dvt_tiny_t2t", 2, 8
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    ms.set_seed(0)
    net = create_model(args.model, drop_path_rate=0.0)
    net.set_train(False)
    spec = net.spec
    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.images, spec.in_chans, spec.img_size, spec.img_size)).astype(np.float32)
    conf = np.stack([softmax(logits.asnumpy()).max(1) for logits in net(ms.Tensor(images))])
    scenarios = [[float(x) for x in text.split(",")] for text in args.fractions]
    flops = np.array(exit_gflops(spec))

    with tempfile.TemporaryDirectory(prefix="bench_deploy_") as folder:
        start = time.perf_counter()
        manifests = export_all(net, folder, args.model)
        exported = time.perf_counter() - start
        start = time.perf_counter()
        stages, runners, inputs = {}, {}, {}
        for (fmt, b), manifest in manifests.items():
            runner = CascadeRunner(manifest, RUNTIMES[fmt])
            runners[(fmt, b)] = runner
            for k, entry in enumerate(runner.manifest["stages"]):
                stages[(fmt, b, k)] = load_stage(os.path.join(os.path.dirname(manifest), entry["file"]),
                                                 RUNTIMES[fmt])
        for b in BATCHES:  # each stage's inputs: the images and what the stage before hands over
            arrays = [images[:b]]
            for k in range(spec.num_stages):
                inputs[(b, k)] = arrays
                arrays = [images[:b], *stages[("ONNX", b, k)](arrays)[1:]]
        for key, stage in stages.items():  # compile and warm up
            stage(inputs[(key[1], key[2])])
        for runner in runners.values():
            runner.run(images, thresholds_for_shares(conf, scenarios[0]))
        loaded = time.perf_counter() - start

        stage_times = {key: [] for key in stages}
        runner_times = {(fmt, b, i): [] for fmt, b in runners for i in range(len(scenarios))}
        exits = {}
        for _ in range(args.rounds):
            for b in BATCHES:
                for k in range(spec.num_stages):
                    for fmt in RUNTIMES:
                        stage, arrays = stages[(fmt, b, k)], inputs[(b, k)]
                        timed(lambda stage=stage, arrays=arrays: stage(arrays), stage_times[(fmt, b, k)])
                for i, shares in enumerate(scenarios):
                    thresholds = thresholds_for_shares(conf, shares)
                    for fmt in RUNTIMES:
                        def run(runner=runners[(fmt, b)], key=(fmt, b, i), thresholds=thresholds):
                            exits[key] = runner.run(images, thresholds).exits
                        timed(run, runner_times[(fmt, b, i)])

    print(f"{args.model}, {spec.img_size}x{spec.img_size}, random weights, {args.rounds} rounds, "
          f"{os.cpu_count()} cores; {runtime_description('mindspore')} vs {runtime_description('onnxruntime')}")
    print(f"exported 4 x {spec.num_stages} stages in {exported:.1f} s; loaded, compiled and warmed up in "
          f"{loaded:.1f} s (not in the figures)")
    print("stage  batch   GraphCell ms   onnxruntime ms   onnxruntime / GraphCell speed")
    for b in BATCHES:
        for k in range(spec.num_stages):
            ms_time, ort_time = (statistics.median(stage_times[(fmt, b, k)]) for fmt in RUNTIMES)
            print(f"{k + 1:5d}  {b:5d}   {ms_time * 1e3:12.1f}   {ort_time * 1e3:14.1f}   {ms_time / ort_time:8.2f}")
    print(f"runner on {args.images} images   exit shares (measured)   GFLOPs   GraphCell img/s   onnxruntime img/s"
          "   ratio")
    for b in BATCHES:
        for i in range(len(scenarios)):
            ms_time, ort_time = (statistics.median(runner_times[(fmt, b, i)]) for fmt in RUNTIMES)
            measured = np.bincount(exits[("ONNX", b, i)], minlength=spec.num_stages) / args.images
            if not np.array_equal(exits[("ONNX", b, i)], exits[("MINDIR", b, i)]):
                measured_text = "(runtimes' exits differ)"
            else:
                measured_text = " / ".join(f"{s:.2f}" for s in measured)
            print(f"batch-{b} export{'':13s}{measured_text:24s} {float(measured @ flops):7.4g}   "
                  f"{args.images / ms_time:15.2f}   {args.images / ort_time:17.2f}   {ms_time / ort_time:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
