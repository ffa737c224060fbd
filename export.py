"""Export a DVT to MindIR, ONNX or AIR: one graph per stage, a manifest, optionally the whole cascade.

    python export.py --ckpt_file runs/demo/best.ckpt        # -> runs/demo/export/dvt_tiny_t2t_stage<k>.mindir
    python export.py --ckpt_file runs/demo/best.ckpt --file_format ONNX --batch_size 8 \\
        --file_name runs/demo/export_onnx/dvt_tiny_t2t

--file_format MINDIR (default; MindSpore, MindSpore Lite), ONNX (onnxruntime, TensorRT, OpenVINO; needs a fixed
--batch_size) or AIR (Ascend only). --batch_size 0 (default) exports a dynamic batch dimension, so the stages
take any sub-batch an early exit leaves; N fixes it (the runner splits and pads any number of images to it).
Writes <file_name>_stage<k>.<ext>, manifest.json beside them, and with --whole_cascade <file_name>_cascade.<ext>
(every exit's logits at once, for apps that do not exit early). Defaults follow the run's folder, as eval.py's
do: --file_name <checkpoint's folder>/export/<model>, --thresholds_file <checkpoint's folder>/eval/thresholds.json
when eval.py has written it. The export owns the folder of <file_name>: it is built beside it and replaces it
only when complete. The manifest carries the class names when the training
data names them (class folders under --data_path, the CIFAR release's names, the demo's digits).
"""

import argparse
import os
import sys

from src.atomic import WriteFailed
from src.config import ConfigError, resolve
from src.models import CheckpointMismatch

MODEL_HELP = ("The model and its preprocessing come from --config_path and config keys (--model, --num_classes, "
              "--img_size, --grids, --mean, --std, --crop_pct, --interpolation, --dataset, --data_path, ...; "
              "`python eval.py --help` lists them all); without a recipe, from the checkpoint's JSON (best.json, "
              "<ckpt>.json). --batch_size is the export's batch, not the recipe's.")


def export_flags() -> argparse.ArgumentParser:
    """export.py's own flags, parsed before the config keys (their --batch_size is another one)."""
    flags = argparse.ArgumentParser(prog="export.py", description=__doc__.splitlines()[0], epilog=MODEL_HELP,
                                    allow_abbrev=False)
    flags.add_argument("--config_path", help="YAML recipe (config/*.yaml) the model was trained with; default: the "
                                             "model the checkpoint's JSON records")
    flags.add_argument("--ckpt_file", required=True, help="best.ckpt, a training checkpoint or a converted one")
    flags.add_argument("--file_name", help="output path prefix (default: <checkpoint's folder>/export/<model>)")
    flags.add_argument("--file_format", default="MINDIR", choices=("MINDIR", "ONNX", "AIR"))
    flags.add_argument("--batch_size", type=int, default=0, help="0: dynamic batch (default); N: fixed")
    flags.add_argument("--whole_cascade", action="store_true", help="also export all exits as one graph")
    flags.add_argument("--thresholds_file", help="eval.py's thresholds.json, copied into the manifest (default: "
                                                 "<checkpoint's folder>/eval/thresholds.json if it exists)")
    return flags


def main(argv: list[str] | None = None) -> int:
    from src.data.sources import class_names
    from src.deploy.export import check_export_folder, check_file_format, export_cascade, preprocess_fields
    from src.engine.checkpoint import recipe_from_checkpoint
    from src.engine.inference import exit_costs, load_network
    from src.metadata import eval_folder_of
    from src.thresholds import FILE_NAME as THRESHOLDS_FILE
    from src.thresholds import read_thresholds

    try:
        # Export's own flags first: its --batch_size (0 = dynamic) is not the training batch of the config.
        args, rest = export_flags().parse_known_args(sys.argv[1:] if argv is None else argv)
        recipe = ["--config_path", args.config_path] if args.config_path else []
        config, _ = resolve(recipe + rest, __doc__.splitlines()[0],
                            no_recipe=lambda cli: recipe_from_checkpoint(args.ckpt_file, cli.model is not None))
        if args.batch_size < 0:
            raise ConfigError(f"--batch_size must be 0 (dynamic) or positive, got {args.batch_size}")
        run_folder = os.path.dirname(os.path.abspath(args.ckpt_file))
        file_name = args.file_name or os.path.join(run_folder, "export", config["model"])
        thresholds_file = args.thresholds_file
        if thresholds_file is None:
            solved = os.path.join(eval_folder_of(args.ckpt_file), THRESHOLDS_FILE)
            if os.path.isfile(solved):
                thresholds_file = solved
                print(f"thresholds: {thresholds_file}")
        check_file_format(args.file_format, args.batch_size or None, config["device_target"])
        folder = os.path.dirname(os.path.abspath(file_name))
        check_export_folder(folder)
        replacing = os.path.isdir(folder) and bool(os.listdir(folder))
        net, meta = load_network(config, args.ckpt_file)
        thresholds = [{"budget_gflops": budget, "thresholds": values} for budget, values in
                      (read_thresholds(thresholds_file, net.num_exits) if thresholds_file else [])]
        preprocess = preprocess_fields(config, net.spec.img_size)
        names = class_names(config["dataset"], config["data_path"])
        if names is not None and len(names) != net.spec.num_classes:
            print(f"note: the training data names {len(names)} classes, the model has {net.spec.num_classes}: "
                  "the manifest gets no class names")
            names = None
        manifest = export_cascade(net, file_name, preprocess=preprocess, batch=args.batch_size or None,
                                  file_format=args.file_format, whole_cascade=args.whole_cascade,
                                  thresholds=thresholds, exit_gflops=exit_costs(net, meta),
                                  model_name=config["model"], class_names=names)
    except (ConfigError, CheckpointMismatch, FileNotFoundError, WriteFailed, ValueError) as err:
        print(f"export.py: error: {err}", file=sys.stderr)
        return 1
    if replacing:
        print(f"note: this export replaced the earlier one in {folder}")
    for name in sorted(os.listdir(folder)):
        if name != os.path.basename(manifest):
            print(f"{os.path.join(folder, name)}  {os.path.getsize(os.path.join(folder, name)) / 1e6:.2f} MB")
    print(f"manifest: {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
