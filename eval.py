"""Evaluate a DVT under a compute budget: every exit's accuracy and GFLOPs, thresholds solved for budgets.

    python eval.py --config_path config/demo.yaml --checkpoint_path runs/demo/best.ckpt
    python eval.py --from_probs runs/demo/eval/probs.npz --budgets 0.3x,0.5x --method exhaustive

--adaptive --budget B runs real early-exit inference with the thresholds solved for B.
--mode solve (default) solves thresholds on a calibration subset of the training split (the paper solves
on training data) for --budgets and scores them on the validation set; --mode stored scores the thresholds
stored with a converted official checkpoint; --mode report prints the results stored with the checkpoint.
Outputs (budget_curve.json / .csv / .png, thresholds.json) go to the eval folder: --output_dir when given, else
eval/ beside the checkpoint (runs/demo/best.ckpt -> runs/demo/eval/), or the folder of --from_probs. --adaptive
and export.py read thresholds.json from the same place. Results of an earlier solve there are moved to
<folder>.replaced-<time>/ first, and eval says so: nothing is overwritten.
Without --config_path, the model (name, classes, image size, grids, eval preprocessing) and the data are the
ones the checkpoint's JSON records (best.json, <ckpt>.json); --dataset and --data_path override the data.
"""

import argparse
import os
import sys
import zipfile
import zlib

import numpy as np

from src.atomic import WriteFailed, write_atomic
from src.budget import METHODS, BudgetError, confidences, read_gflops, resolve_budgets, simulate, solve
from src.config import ConfigError, resolve
from src.data.sources import DataError
from src.metadata import eval_folder_of
from src.models import CheckpointMismatch
from src.report import PLOT_HINT, plot_curve, table, write_curve
from src.thresholds import FILE_NAME as THRESHOLDS_FILE
from src.thresholds import write_thresholds

PROBS_KEYS = ("val_probs", "val_labels", "calib_probs", "calib_labels", "flops")
RESULT_FILES = ("budget_curve.json", "budget_curve.csv", "budget_curve.png", THRESHOLDS_FILE)


def eval_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--checkpoint_path", help="best.ckpt, a training checkpoint (EMA weights) or a converted one; "
                                                  "without --config_path, its JSON names the model")
    flags.add_argument("--mode", choices=("solve", "stored", "report"), default="solve")
    flags.add_argument("--method", choices=METHODS, default="ga", help="threshold solver (default ga)")
    flags.add_argument("--budgets", default="official",
                       help="'official' (the 59 of the official protocol), GFLOPs '1.2,2.0' or fractions '0.4x'")
    flags.add_argument("--calib_size", type=int, default=50000, help="calibration images drawn from the train split")
    flags.add_argument("--calib_seed", type=int, default=0)
    flags.add_argument("--save_probs", metavar="FILE.npz", help="save every exit's softmax for --from_probs")
    flags.add_argument("--from_probs", metavar="FILE.npz", help="re-solve from saved probabilities, no model or data")
    flags.add_argument("--backbone_point", metavar="GFLOPS,TOP1", help="the plain backbone's point for the plot")
    flags.add_argument("--adaptive", action="store_true",
                       help="real early-exit inference on the validation set at --budget, thresholds from "
                            "--thresholds_file")
    flags.add_argument("--budget", help="GFLOPs per image for --adaptive")
    flags.add_argument("--eval_micro_batch", type=int, default=8,
                       help="every exit's probabilities: each image runs the stages one after another in static "
                            "graphs of this many samples, so memory does not grow with the eval batch; 0 = the "
                            "whole cascade as one graph of the eval batch (fastest to compile, most memory)")
    flags.add_argument("--micro_batch", type=int, default=16,
                       help="--adaptive: stages run sub-batches in static graphs of this many samples (and the "
                            "remainder's binary digits); 0 = one dynamic-batch graph per stage")
    flags.add_argument("--thresholds_file", help="eval.py's thresholds.json (default: the eval folder's)")
    return flags


def eval_folder(args: argparse.Namespace) -> str:
    """Where results go and --adaptive finds thresholds.json: --output_dir if given, else the folder of
    --from_probs, else eval/ beside the checkpoint."""
    if args.output_dir:
        return args.output_dir
    if args.from_probs:
        return os.path.dirname(os.path.abspath(args.from_probs))
    if args.checkpoint_path:
        return eval_folder_of(args.checkpoint_path)
    raise ConfigError("give --checkpoint_path (or --from_probs)")


def set_aside_results(folder: str) -> str | None:
    """Move an earlier solve's result files out of `folder` into `<folder>.replaced-<time>/` (what else is
    there, e.g. probs.npz or a log, stays); returns where they went, or None if there were none."""
    from src.engine.run_dir import move_aside

    present = os.listdir(folder) if os.path.isdir(folder) else []
    if not set(present) & set(RESULT_FILES):
        return None
    try:
        return move_aside(folder, keep=tuple(name for name in present if name not in RESULT_FILES))
    except OSError as err:
        raise WriteFailed(folder, err) from err


def checkpoint_recipe(args: argparse.Namespace) -> dict:
    """Without --config_path: the model the checkpoint's JSON records ({} where no model is built)."""
    from src.engine.checkpoint import recipe_from_checkpoint

    if args.from_probs or args.mode == "report" or not args.checkpoint_path:
        return {}
    return recipe_from_checkpoint(args.checkpoint_path, model_given=args.model is not None)


def load_probs(path: str) -> dict:
    """The arrays of an --save_probs file, checked (check_probs); any other file is an error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"probabilities file not found: {path}")
    try:
        data = np.load(path)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array (.npy)")
        with data:
            content = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:  # a .csv, a truncated archive
        raise ValueError(f"{path} is not a probabilities file (.npz of eval.py --save_probs): {err}") from err
    missing = set(PROBS_KEYS) - set(content)
    if missing:
        raise ValueError(f"{path} lacks {', '.join(sorted(missing))} (write it with eval.py --save_probs)")
    check_probs(content, path)
    return content


def check_probs(data: dict, source: str) -> None:
    """Probabilities (exits, samples, classes) that are finite and in [0, 1], labels of as many samples, one
    finite positive cost per exit; a ValueError naming `source` and the array otherwise."""
    flops = np.asarray(data["flops"])
    if flops.ndim != 1 or not np.issubdtype(flops.dtype, np.number) or not np.isfinite(flops).all() \
            or (flops <= 0).any():
        raise ValueError(f"{source}: flops must be one finite positive cost per exit, got {flops.tolist()}")
    for split in ("val", "calib"):
        probs, labels = np.asarray(data[f"{split}_probs"]), np.asarray(data[f"{split}_labels"])
        name = f"{split}_probs"
        if not np.issubdtype(probs.dtype, np.floating) or probs.ndim != 3 or probs.shape[0] != len(flops):
            raise ValueError(f"{source}: {name} must be floats (exits={len(flops)}, samples, classes), got "
                             f"{probs.dtype} {probs.shape}")
        bad = int((~np.isfinite(probs)).sum())
        if bad:
            raise ValueError(f"{source}: {name} holds {bad} NaN/Inf value(s) of {probs.size}")
        if probs.size and (probs.min() < -1e-6 or probs.max() > 1 + 1e-6):
            raise ValueError(f"{source}: {name} holds values outside [0, 1] ({probs.min():.4g} .. {probs.max():.4g}): "
                             "not probabilities")
        if labels.shape != probs.shape[1:2] or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{source}: {split}_labels must be {probs.shape[1]} integers, got {labels.dtype} "
                             f"{labels.shape}")


def compute_probs(config: dict, args) -> dict:
    """Run the cascade over the validation set and a calibration subset of the training split."""
    from src.data.pipeline import create_eval_loader
    from src.engine.evaluate import collect_probs
    from src.engine.inference import exit_costs, load_network
    from src.engine.stagewise import StagewiseCascade

    if not args.checkpoint_path:
        raise ConfigError("give --checkpoint_path (or --from_probs)")
    if args.eval_micro_batch < 0:
        raise ConfigError(f"--eval_micro_batch must be 0 (one graph) or a number of samples, not "
                          f"{args.eval_micro_batch}")
    net, meta = load_network(config, args.checkpoint_path)
    img_size = net.spec.img_size
    val = create_eval_loader(config, img_size)
    calib = create_eval_loader(config, img_size, split="train", subset=args.calib_size, subset_seed=args.calib_seed)
    cascade = StagewiseCascade(net, args.eval_micro_batch) if args.eval_micro_batch else net
    val_probs, val_labels = collect_probs(cascade, val.batches(), net.num_exits)
    calib_probs, calib_labels = collect_probs(cascade, calib.batches(), net.num_exits)
    return {"val_probs": val_probs, "val_labels": val_labels, "calib_probs": calib_probs,
            "calib_labels": calib_labels, "flops": np.asarray(exit_costs(net, meta), np.float64), "meta": meta}


def run_adaptive(config: dict, args) -> int:
    """Early-exit inference over the validation set at one budget; prints accuracy, exits, GFLOPs, speed."""
    import time

    from src.data.pipeline import create_eval_loader
    from src.engine.adaptive import AdaptiveCascade
    from src.engine.inference import exit_costs, load_network
    from src.thresholds import read_thresholds, thresholds_for

    if args.budget is None:
        raise ConfigError("--adaptive needs --budget GFLOPS")
    budget = read_gflops(args.budget, "--budget")
    if not args.checkpoint_path:
        raise ConfigError("give --checkpoint_path")
    net, meta = load_network(config, args.checkpoint_path)
    table_path = args.thresholds_file or os.path.join(eval_folder(args), THRESHOLDS_FILE)
    thresholds = thresholds_for(read_thresholds(table_path, net.num_exits), budget)
    flops = exit_costs(net, meta)
    cascade = AdaptiveCascade(net, thresholds, micro_batch=args.micro_batch)
    start = time.perf_counter()
    graphs = cascade.warm_up()
    compiling = time.perf_counter() - start
    exits, correct, seconds = [], 0, 0.0
    for images, labels in create_eval_loader(config, net.spec.img_size).batches():
        start = time.perf_counter()
        result = cascade(images)
        seconds += time.perf_counter() - start
        exits.append(result.exits)
        correct += int((result.predictions == labels.asnumpy()).sum())
    exits = np.concatenate(exits)
    fractions = np.bincount(exits, minlength=len(flops)) / len(exits)
    print(f"adaptive inference at {budget:.4g} GFLOPs (thresholds {', '.join(f'{t:.4g}' for t in thresholds)})")
    print(f"  top-1 {100.0 * correct / len(exits):.2f}% on {len(exits)} images; exit fractions "
          f"{' '.join(f'{f:.3f}' for f in fractions)}; {float(fractions @ np.asarray(flops)):.4g} GFLOPs per image")
    print(f"  {len(exits) / seconds:.1f} images/s, not counting the {compiling:.1f} s of compiling the stages' "
          f"{graphs} graphs first")
    return 0


def curve_rows(thresholds_list, budgets, val_conf, val_correct, flops) -> list[dict]:
    return [simulate(t, val_conf, val_correct, flops).as_dict(float(b))
            for t, b in zip(thresholds_list, budgets, strict=True)]


def main(argv: list[str] | None = None) -> int:
    from src.engine.evaluate import accuracy_per_exit

    try:
        config, args = resolve(argv, __doc__.splitlines()[0], eval_flags(), no_recipe=checkpoint_recipe)
        if args.adaptive:
            return run_adaptive(config, args)
        if args.mode == "report":
            return report_stored(args.checkpoint_path)
        data = load_probs(args.from_probs) if args.from_probs else compute_probs(config, args)
        if not args.from_probs:
            check_probs(data, f"the probabilities of {args.checkpoint_path}")
        flops = [float(f) for f in data["flops"]]
        exits = accuracy_per_exit(data["val_probs"], data["val_labels"])
        val_conf, val_correct = confidences(data["val_probs"], data["val_labels"])
        calib_conf, calib_correct = confidences(data["calib_probs"], data["calib_labels"])
        if args.mode == "stored":
            stored = (data.get("meta") or {}).get("dynamic_threshold")
            if stored is None:
                raise ConfigError(f"{args.checkpoint_path} stores no thresholds (dynamic_threshold)")
            thresholds_list = [list(map(float, row)) for row in stored]
            budgets = [simulate(t, calib_conf, calib_correct, flops).expected_gflops for t in thresholds_list]
        else:
            budgets = resolve_budgets(args.budgets, flops, calib_conf, calib_correct)
            thresholds_list = solve(args.method, data["calib_probs"], data["calib_labels"], flops, budgets,
                                    seed=config["seed"])
        curve = curve_rows(thresholds_list, budgets, val_conf, val_correct, flops)
    except (ConfigError, DataError, CheckpointMismatch, BudgetError, OSError, ValueError) as err:
        print(f"eval.py: error: {err}", file=sys.stderr)
        return 1
    try:
        write_results(config, args, data, curve, exits, flops)
    except (WriteFailed, ValueError) as err:
        print(f"eval.py: error: {err}", file=sys.stderr)
        return 1
    return 0


def write_results(config: dict, args, data: dict, curve: list[dict], exits: dict, flops: list[float]) -> None:
    """The probabilities (--save_probs), the table, the curve files, thresholds.json and the plot, in the eval
    folder, whose earlier results are set aside first."""
    out = eval_folder(args)
    aside = set_aside_results(out)
    if aside:
        print(f"note: the earlier results in {out} were moved to {aside}")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise WriteFailed(out, err) from err
    model = str(data["model"]) if "model" in data else config["model"]
    if args.save_probs:
        arrays = {k: v for k, v in data.items() if k not in ("meta", "model")}

        def save(tmp: str) -> None:
            with open(tmp, "wb") as handle:  # a handle: numpy would add .npz to a name without it
                np.savez_compressed(handle, model=np.array(model), **arrays)

        write_atomic(args.save_probs, save)
    print(table(curve, exits, flops))
    written = write_curve(curve, out)
    written.append(write_thresholds(curve, {"model": model, "method": args.method, "exit_gflops": flops,
                                            "val_top1_per_exit": exits["top1"]}, out))
    backbone = tuple(map(float, args.backbone_point.split(","))) if args.backbone_point else None
    plot = plot_curve(curve, exits, flops, out, f"{model}: accuracy vs GFLOPs", backbone)
    written.append(plot or PLOT_HINT)
    print("\nwrote " + ", ".join(written))


def report_stored(checkpoint_path: str | None) -> int:
    """The results stored in a checkpoint's JSON (a converted official one, or ours) as a table, once the
    checkpoint itself reads whole: a truncated or corrupt file (or JSON) is an error naming it."""
    from src.metadata import meta_path, read_meta
    from src.models.weights import read_checkpoint
    from src.report import stored_table

    if not checkpoint_path or not os.path.isfile(checkpoint_path):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint_path}")
    read_checkpoint(checkpoint_path)
    meta = read_meta(checkpoint_path)
    text = stored_table(meta, checkpoint_path)
    if not text:
        print(f"{checkpoint_path} has no stored results (no JSON beside it)")
        return 1
    print(text)
    print(f"\nall of it, as JSON: {meta_path(checkpoint_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
