"""Run configuration: a YAML recipe, then command-line overrides of any key, every key checked.

Every key that a recipe or the command line may set is declared once in `OPTIONS`, with its type,
default and meaning. A key that is not declared is an error naming the closest declared one, so a typo
in a recipe can never silently train another model. `train.py` and `eval.py` share the table.
"""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from .atomic import write_text


@dataclass(frozen=True)
class Option:
    default: Any
    help: str
    kind: type | tuple = str  # int, float, bool, str, or (list, int) / (list, float) for lists
    choices: tuple | None = None
    nullable: bool = False
    minimum: int | None = None  # the smallest value allowed (counts and intervals)


OPTIONS: dict[str, Option] = {
    # model
    "model": Option("dvt_t2t_vit_12", "registered model name (see scripts/list_models.py)"),
    "num_classes": Option(1000, "classes of the head", int),
    "img_size": Option(None, "input side in pixels; null: the model's default", int, nullable=True),
    "grids": Option(None, "token grid side of every exit, e.g. [7, 14]; null: the model's", (list, int),
                    nullable=True),
    "feature_reuse": Option(True, "stage k reuses stage k-1's final tokens", bool),
    "relation_reuse": Option(True, "stage k reuses stage k-1's attention logits", bool),
    "drop_rate": Option(0.0, "dropout in MLPs and after the position embedding", float),
    "drop_path_rate": Option(0.1, "stochastic depth of the last block (linear from 0)", float),
    "pretrained": Option(None, "MindSpore checkpoint to start from; a head of another size is dropped", str,
                         nullable=True),
    "resume": Option(None, "training checkpoint to resume, or 'auto' for the newest in output_dir", str,
                     nullable=True),
    # data
    "dataset": Option("folder", "folder: ImageNet-style train/ and val/ class folders; cifar10, cifar100: the "
                      "binary release; demo: the digits that ship with scikit-learn",
                      choices=("folder", "cifar10", "cifar100", "demo")),
    "data_path": Option(None, "dataset root (not used by the demo)", str, nullable=True),
    "train_split": Option("train", "sub-folder (folder) of the training images"),
    "val_split": Option("val", "sub-folder (folder) of the validation images"),
    "skip_corrupt": Option(False, "skip and count unreadable images instead of stopping", bool),
    "num_parallel_workers": Option(4, "data loading workers per device, each building whole batches", int),
    "python_multiprocessing": Option(True, "loader workers are processes (scale with cores); false: threads, "
                                     "cheaper to start for light transforms", bool),
    "batch_size": Option(128, "images per device and micro-batch", int, minimum=1),
    "accum_steps": Option(1, "micro-batches per optimizer update (gradient accumulation): the update equals "
                          "one step on accum_steps x batch_size images per device", int, minimum=1),
    "eval_batch_size": Option(100, "images per device in validation", int),
    "shuffle": Option(True, "shuffle the training set every epoch", bool),
    "crop_pct": Option(0.875, "eval: resize the short side to img_size / crop_pct, then centre crop", float),
    "interpolation": Option("bicubic", "resampling of resize and random-resized-crop",
                            choices=("bicubic", "bilinear", "random")),
    "scale": Option([0.08, 1.0], "random-resized-crop area range", (list, float)),
    "ratio": Option([0.75, 1.3333333], "random-resized-crop aspect range", (list, float)),
    "hflip": Option(0.5, "horizontal flip probability", float),
    "auto_augment": Option("rand-m9-mstd0.5-inc1", "RandAugment policy string; null: none", str, nullable=True),
    "re_prob": Option(0.25, "random erasing probability (per-pixel normal noise)", float),
    "mixup": Option(0.8, "mixup alpha; 0: off", float),
    "cutmix": Option(1.0, "cutmix alpha; 0: off", float),
    "mixup_prob": Option(1.0, "probability of mixing a batch", float),
    "mixup_switch_prob": Option(0.5, "probability of cutmix rather than mixup", float),
    "label_smoothing": Option(0.1, "label smoothing of the soft targets", float),
    "mean": Option([0.485, 0.456, 0.406], "normalisation mean (RGB, 0..1)", (list, float)),
    "std": Option([0.229, 0.224, 0.225], "normalisation std (RGB, 0..1)", (list, float)),
    # optimisation
    "epochs": Option(300, "cosine epochs (cooldown comes after)", int),
    "cooldown_epochs": Option(10, "epochs at min_lr after the cosine", int),
    "warmup_epochs": Option(20, "linear warm-up epochs from warmup_lr", int),
    "lr": Option(2e-3, "peak learning rate (no linear scaling with batch is applied)", float),
    "warmup_lr": Option(1e-6, "learning rate at the start of warm-up", float),
    "min_lr": Option(1e-5, "floor of the cosine", float),
    "lr_per_step": Option(False, "update the learning rate every step rather than every epoch", bool),
    "weight_decay": Option(0.03, "AdamW decoupled weight decay (none on norms and biases)", float),
    "decay_tokens": Option(True, "also decay cls_token and pos_embed (the official recipe does)", bool),
    "beta1": Option(0.9, "AdamW beta1", float),
    "beta2": Option(0.999, "AdamW beta2", float),
    "eps": Option(1e-8, "AdamW epsilon", float),
    "clip_grad": Option(None, "clip gradients to this global norm; null: no clipping", float, nullable=True),
    "ema": Option(True, "keep an exponential moving average of the weights", bool),
    "ema_decay": Option(0.99996, "EMA decay per step", float),
    "amp_level": Option("O0", "mixed precision: O0 fp32; O2, O3 or auto fp16 (GPU, Ascend)",
                        choices=("O0", "O2", "O3", "auto")),
    "loss_scale_type": Option("dynamic", "loss scaling: dynamic (skips overflowed steps), fixed, or none",
                              choices=("dynamic", "fixed", "none")),
    "loss_scale": Option(65536.0, "initial (dynamic) or constant (fixed) loss scale", float),
    "loss_scale_window": Option(2000, "dynamic: steps without overflow before the scale doubles", int),
    # run
    "device_target": Option("CPU", "device to run on", choices=("CPU", "GPU", "Ascend")),
    "distribute": Option(False, "data-parallel over the processes started by msrun / a rank table", bool),
    "deterministic": Option(False, "deterministic device kernels (MindSpore's deterministic='ON'; slower on GPU "
                            "and Ascend)", bool),
    "seed": Option(42, "random seed (rank is added for data augmentation)", int),
    "output_dir": Option("runs/default", "run directory: checkpoints, log, resolved config"),
    "overwrite": Option(False, "train anew into an output_dir that holds another run: that run is moved aside to "
                        "<output_dir>.replaced-<time> (without it, such a directory is refused unless resuming)",
                        bool),
    "keep_checkpoints": Option(3, "training checkpoints kept (plus best)", int),
    "ckpt_all_ranks": Option(False, "ranks other than 0 also save, under output_dir/rank_<r> (to compare replicas)",
                             bool),
    "ckpt_interval": Option(1, "save a training checkpoint every this many epochs", int, minimum=1),
    "save_interval_steps": Option(None, "also save a training checkpoint every this many optimizer updates, "
                                  "inside epochs (resume continues with the next batch)", int, nullable=True,
                                  minimum=1),
    "checkpoint_on_stop": Option(True, "on SIGTERM or SIGINT, save a training state where training stops",
                                 bool),
    "max_steps_per_epoch": Option(None, "cap on steps per epoch (smoke tests)", int, nullable=True, minimum=1),
    "eval_interval": Option(1, "validate every this many epochs (and after the last); 0: never during training "
                            "(no best.ckpt; evaluate a checkpoint with eval.py)", int, minimum=0),
    "log_interval": Option(50, "every this many updates: read loss and overflow flags from the device, write a "
                           "step record, check for NaN", int, minimum=1),
    "progress": Option(True, "tqdm progress bar on rank 0 (off when not a terminal)", bool),
}


class ConfigError(ValueError):
    """A recipe or an override names an unknown key or gives a value of the wrong kind."""


def _closest(key: str) -> str:
    match = difflib.get_close_matches(key, list(OPTIONS), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def _to_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _to_scalar(value: Any, kind: type, key: str) -> Any:
    if kind is bool:
        return _to_bool(value, key)
    if kind is str:
        return str(value)
    try:
        number = kind(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or (kind is int and isinstance(value, float) and value != number):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    return number


def coerce(key: str, value: Any) -> Any:
    """Check and convert one value (from YAML or a command-line string) to the key's declared kind."""
    option = OPTIONS[key]
    if isinstance(value, str) and option.kind is not str:
        value = yaml.safe_load(value) if value.strip() else None
    if isinstance(value, str) and option.nullable and value.lower() in ("null", "none"):
        return None
    if value is None:
        if option.nullable:
            return None
        raise ConfigError(f"{key} cannot be null")
    if isinstance(option.kind, tuple):
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_to_scalar(item, option.kind[1], key) for item in items]
    result = _to_scalar(value, option.kind, key)
    if option.choices and result not in option.choices:
        raise ConfigError(f"{key}: {result!r} is not one of {', '.join(map(str, option.choices))}")
    if option.minimum is not None and result < option.minimum:
        raise ConfigError(f"{key}: {result!r} is below its minimum {option.minimum}")
    return result


def _check_keys(keys, source: str) -> None:
    for key in keys:
        if key not in OPTIONS:
            raise ConfigError(f"unknown config key {key!r} in {source}{_closest(key)}")


def load_recipe(path: str) -> dict[str, Any]:
    """Read a YAML recipe: a flat mapping of declared keys."""
    if os.path.isdir(path):
        raise ConfigError(f"config path {path} is a directory: give a YAML recipe file (config/*.yaml)")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            recipe = yaml.safe_load(handle) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    if not isinstance(recipe, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, not {type(recipe).__name__}")
    _check_keys(recipe, path)
    return {key: coerce(key, value) for key, value in recipe.items()}


def build_parser(description: str, extra: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """An argparse parser with --config_path and one --KEY per declared option."""
    parser = argparse.ArgumentParser(description=description, parents=[extra] if extra else [],
                                     allow_abbrev=False)
    parser.add_argument("--config_path", help="YAML recipe (config/*.yaml); command-line keys override it")
    for key, option in OPTIONS.items():
        parser.add_argument(f"--{key}", default=None, metavar="V", help=f"{option.help} (default: {option.default})")
    return parser


def resolve(argv: list[str] | None, description: str, extra: argparse.ArgumentParser | None = None,
            no_recipe: Callable[[argparse.Namespace], dict[str, Any]] | None = None,
            ) -> tuple[dict[str, Any], argparse.Namespace]:
    """Defaults, then the recipe, then the command line. Returns the config and the parsed namespace.

    `extra` adds program-only flags (not config keys). An unknown flag is an error with a suggestion.
    Without --config_path, `no_recipe(args)` gives the recipe's keys instead (eval and export read the model
    from the checkpoint's JSON); they are checked like a recipe's.
    """
    parser = build_parser(description, extra)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [item for item in unknown if item.startswith("--")]
        if not flags:
            parser.error(f"unexpected argument(s): {' '.join(unknown)}")
        key = flags[0][2:].split("=", 1)[0]
        raise ConfigError(f"unknown config key {key!r} on the command line{_closest(key)}")
    config = {key: option.default for key, option in OPTIONS.items()}
    if args.config_path:
        config.update(load_recipe(args.config_path))
    elif no_recipe is not None:
        config.update({key: coerce(key, value) for key, value in no_recipe(args).items()})
    for key in OPTIONS:
        value = getattr(args, key)
        if value is not None:
            config[key] = coerce(key, value)
    return config, args


def save_config(config: dict[str, Any], path: str) -> None:
    """Write the resolved config as YAML (whole or not at all), so a run can be repeated from its directory."""
    write_text(path, yaml.safe_dump(config, sort_keys=False))
