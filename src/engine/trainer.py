"""The training run behind train.py: device and ranks, data, model, optimizer, loop, checkpoints, logs.

Rank 0 writes everything in `output_dir`: `config.yaml` (the resolved config), `train.log`,
`metrics.jsonl` (step and epoch records), the training checkpoints and `best.ckpt`, each with its JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time

import mindspore as ms
import mindspore.dataset as ds
from mindspore import ParameterTuple, Tensor, nn, ops
from tqdm import tqdm

from ..config import save_config
from ..data.pipeline import create_eval_loader, create_train_loader
from ..data.sources import DataError
from ..flops import exit_gflops
from ..models import DVT, create_model
from ..models.tokenizers import TokenPerformer
from .checkpoint import (
    CheckpointManager,
    check_architecture,
    load_model_weights,
    load_pretrained,
    load_train_state,
    read_meta,
)
from .evaluate import evaluate
from .optim import AdamW, param_groups
from .schedule import cosine_schedule
from .train_step import DVTWithLoss, ModelEMA, TrainStep, loss_scale_sense

log = logging.getLogger("dvt")
MAX_SKIPPED_IN_A_ROW = 100


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf and loss scaling cannot recover it."""


def use_device(target: str) -> None:
    """Graph mode on `target`. MindSpore fixes the device once kernels have run; asking again for the
    same one (a second run in one process) is fine, asking for another is its error."""
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        ms.set_device(target)
    except RuntimeError:
        if ms.get_context("device_target") != target:
            raise


def setup_device(config: dict) -> tuple[int, int]:
    """Graph mode on the configured device; with `distribute`, join the communication group."""
    use_device(config["device_target"])
    if not config["distribute"]:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init

    init()
    rank, group_size = get_rank(), get_group_size()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=group_size)
    return rank, group_size


class _CopyFromRankZero(nn.Cell):
    """Give every rank rank 0's parameter values: an all-reduce sum of rank 0's values and everyone else's zeros."""

    def __init__(self, net: nn.Cell, rank: int):
        super().__init__(auto_prefix=False)
        self.params = ParameterTuple(net.get_parameters())
        self.keep = Tensor(1.0 if rank == 0 else 0.0, ms.float32)
        self.all_reduce = ops.AllReduce()

    def construct(self):
        for param in self.params:
            ops.assign(param, self.all_reduce(param * self.keep.astype(param.dtype)))
        return self.keep


def replicate_rank_zero(net: nn.Cell, rank: int) -> None:
    """Start every replica from the same weights: MindSpore draws initial weights per rank."""
    _CopyFromRankZero(net, rank)()


def setup_logging(run_dir: str, rank: int) -> None:
    log.setLevel(logging.INFO)
    log.handlers.clear()
    log.propagate = False
    prefix = f"[rank {rank}] " if rank else ""
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(logging.Formatter(prefix + "%(message)s"))
    log.addHandler(stream)
    if rank == 0:
        handler = logging.FileHandler(os.path.join(run_dir, "train.log"), encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)


def build_model(config: dict, num_classes: int) -> DVT:
    overrides = {key: config[key] for key in ("img_size", "grids") if config[key] is not None}
    return create_model(config["model"], num_classes=num_classes, feature_reuse=config["feature_reuse"],
                        relation_reuse=config["relation_reuse"], drop_path_rate=config["drop_path_rate"],
                        drop_rate=config["drop_rate"], **overrides)


def load_network(config: dict, checkpoint_path: str) -> tuple[DVT, dict]:
    """The configured model on the configured device with a checkpoint's weights (the EMA's when present),
    refusing a checkpoint of another architecture; returns it and the checkpoint's JSON."""
    use_device(config["device_target"])
    net = build_model(config, config["num_classes"])
    meta = read_meta(checkpoint_path)
    check_architecture(meta, net.spec.to_dict(), config["model"], checkpoint_path)
    load_model_weights(net, checkpoint_path, prefer_ema=True)
    return net, meta


def exit_costs(net: DVT, meta: dict) -> list[float]:
    """Cumulative GFLOPs of every exit: the checkpoint's record when it has one, else counted."""
    return [float(f) for f in (meta.get("exit_gflops") or meta.get("analytic_gflops") or exit_gflops(net.spec))]


def apply_amp(net: DVT, level: str) -> None:
    """fp16 compute per `amp_level`, keeping LayerNorm and the performer (its exp overflows) in fp32."""
    if level == "O0":
        return
    ms.amp.auto_mixed_precision(net, amp_level=level, dtype=ms.float16)
    for _, cell in net.cells_and_names():
        if isinstance(cell, (nn.LayerNorm, TokenPerformer)):
            cell.to_float(ms.float32)


class MetricsLog:
    """JSON-lines records of steps and epochs (rank 0 only)."""

    def __init__(self, path: str | None):
        self.path = path

    def write(self, record: dict) -> None:
        if self.path:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


def _format_accuracy(result: dict) -> str:
    return " / ".join(f"{acc:.2f}" for acc in result["top1"])


def _batches(dataset):
    """Iterate a loader, turning an unreadable image deep in the pipeline into a DataError naming it."""
    try:
        yield from dataset.create_tuple_iterator(num_epochs=1)
    except RuntimeError as err:
        found = re.search(r"DataError: (cannot read image [^\n]*)", str(err))
        if found is None:
            raise
        raise DataError(f"{found.group(1).strip()}\n(set skip_corrupt: true to skip and count unreadable images)"
                        ) from None


def train(config: dict) -> dict:
    """Run a whole training; returns the final validation results and where the checkpoints are."""
    rank, group_size = setup_device(config)
    run_dir = os.path.abspath(config["output_dir"])
    os.makedirs(run_dir, exist_ok=True)
    setup_logging(run_dir, rank)
    ms.set_seed(config["seed"])
    ds.config.set_seed(config["seed"] + rank)
    is_main = rank == 0

    # The model first, for img_size; the data then fixes num_classes, which must agree with the config.
    net = build_model(config, config["num_classes"])
    img_size = net.spec.img_size
    train_loader = create_train_loader(config, img_size, rank, group_size)
    val_loader = create_eval_loader(config, img_size, rank, group_size)
    if train_loader.num_classes != config["num_classes"]:
        raise ValueError(f"the {config['dataset']} data has {train_loader.num_classes} classes but num_classes "
                         f"is {config['num_classes']}; set num_classes: {train_loader.num_classes}")
    spec_dict = net.spec.to_dict()
    gflops = exit_gflops(net.spec)
    if config["pretrained"]:
        load_pretrained(net, config["pretrained"])
        log.info("started from %s", config["pretrained"])
    if group_size > 1:
        replicate_rank_zero(net, rank)
    apply_amp(net, config["amp_level"])

    steps_per_epoch = train_loader.dataset.get_dataset_size()
    if config["max_steps_per_epoch"]:
        steps_per_epoch = min(steps_per_epoch, config["max_steps_per_epoch"])
        train_loader.dataset = train_loader.dataset.take(steps_per_epoch)
    total_epochs = config["epochs"] + config["cooldown_epochs"]
    schedule = cosine_schedule(config["lr"], config["epochs"], steps_per_epoch, config["warmup_epochs"],
                               config["warmup_lr"], config["min_lr"], config["cooldown_epochs"],
                               per_step=config["lr_per_step"])
    optimizer = AdamW(param_groups(net, config["weight_decay"], config["decay_tokens"]),
                      learning_rate=ms.Tensor(schedule), beta1=config["beta1"], beta2=config["beta2"],
                      eps=config["eps"])
    ema = None
    if config["ema"]:
        shadow = build_model(config, config["num_classes"])
        apply_amp(shadow, config["amp_level"])
        ema = ModelEMA(net, shadow, config["ema_decay"])
    scale = loss_scale_sense(config["loss_scale_type"], config["loss_scale"], config["loss_scale_window"])
    train_step = TrainStep(DVTWithLoss(net), optimizer, scale, config["clip_grad"], ema)

    checkpoints = None
    if is_main or config["ckpt_all_ranks"]:
        own_dir = run_dir if is_main else os.path.join(run_dir, f"rank_{rank}")
        checkpoints = CheckpointManager(own_dir, config["model"], config["keep_checkpoints"])
    if is_main:
        for stale in checkpoints.remove_partial():
            log.info("removed %s, a partial file of an interrupted run", stale)
        save_config(config, os.path.join(run_dir, "config.yaml"))
    start_epoch, best = 0, {"metric": -1.0, "epoch": None}
    resume = config["resume"]
    if resume == "auto":
        resume = CheckpointManager(run_dir, config["model"], config["keep_checkpoints"]).latest()
        if resume is None:
            log.info("resume auto: no checkpoint in %s, starting from scratch", run_dir)
    if resume:
        meta = load_train_state(train_step, resume, spec_dict, config["model"])
        start_epoch = meta["epoch"]
        best = meta.get("best", best)
        log.info("resumed %s: epoch %d done, step %d", resume, meta["epoch"], meta["step"])

    metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl") if is_main else None)
    base_meta = {"model": config["model"], "spec": spec_dict, "num_classes": config["num_classes"],
                 "grids": list(net.spec.grids), "exit_gflops": gflops, "img_size": img_size,
                 "mean": config["mean"], "std": config["std"], "crop_pct": config["crop_pct"]}
    log.info("%s: %d exits %s, %.4g GFLOPs per exit %s; %d images per rank, %d steps/epoch x %d epochs, "
             "%d rank(s)", config["model"], net.num_exits, net.spec.grids, gflops[-1],
             [round(g, 4) for g in gflops], train_loader.num_samples, steps_per_epoch, total_epochs, group_size)

    show_bar = is_main and config["progress"] and sys.stderr.isatty()
    global_batch = config["batch_size"] * group_size
    result, ema_result, skipped_in_a_row, skipped_total = None, None, 0, 0
    last_saved = resume
    # The schedule index, kept on the host: every step advances it, applied or skipped (see TrainStep).
    step = int(optimizer.global_step.asnumpy().reshape(-1)[0])
    for epoch in range(start_epoch, total_epochs):
        train_step.set_train(True)
        started = time.perf_counter()
        losses = []
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{total_epochs}", disable=not show_bar,
                   dynamic_ncols=True, leave=False)
        for images, targets in _batches(train_loader.dataset):
            lr = float(schedule[min(step, len(schedule) - 1)])
            loss, overflowed, loss_scale = train_step(images, targets)
            step += 1
            loss_value = float(loss.asnumpy())
            overflowed = bool(overflowed.asnumpy())
            if not math.isfinite(loss_value) or overflowed:
                skipped_total += 1
                skipped_in_a_row += 1
                if config["loss_scale_type"] != "dynamic" or skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                    raise TrainingDiverged(
                        f"the loss is {loss_value} at epoch {epoch + 1}, step {step} (lr {lr:.3g}); stopped "
                        f"without saving. The last good checkpoint is {last_saved or 'none (nothing was saved)'}. "
                        "Lower lr, set clip_grad, or use loss_scale_type: dynamic for fp16.")
            else:
                skipped_in_a_row = 0
                losses.append(loss_value)
            elapsed = time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.3g}",
                            img_s=f"{global_batch * bar.n / max(elapsed, 1e-9):.1f}")
            if step % config["log_interval"] == 0:
                metrics.write({"type": "step", "epoch": epoch + 1, "step": step, "lr": lr, "loss": loss_value,
                               "loss_scale": float(loss_scale.asnumpy()), "overflow": overflowed})
        bar.close()
        elapsed = time.perf_counter() - started
        train_loss = sum(losses) / max(len(losses), 1)
        last = epoch + 1 == total_epochs
        skipped = len(train_loader.skipped)
        log.info("epoch %d/%d: loss %.4f, lr %.3g, %.1f img/s, %.0f s%s", epoch + 1, total_epochs, train_loss,
                 float(schedule[min(step, len(schedule)) - 1]), global_batch * steps_per_epoch / elapsed, elapsed,
                 f", {skipped} corrupt image(s) skipped so far" if skipped else "")
        record = {"type": "epoch", "epoch": epoch + 1, "step": step, "train_loss": train_loss,
                  "overflow_steps": skipped_total, "seconds": elapsed}
        if last or (epoch + 1) % config["eval_interval"] == 0:
            result = evaluate(net, val_loader.dataset, net.num_exits, group_size)
            log.info("  val top-1 per exit: %s (%d images)", _format_accuracy(result), result["count"])
            record["val"] = result
            if ema is not None:
                ema_result = evaluate(ema.shadow, val_loader.dataset, net.num_exits, group_size)
                log.info("  EMA val top-1 per exit: %s", _format_accuracy(ema_result))
                record["ema_val"] = ema_result
            chosen = ema_result if ema is not None else result
            if checkpoints and chosen["top1"][-1] > best["metric"]:
                best = {"metric": chosen["top1"][-1], "epoch": epoch + 1}
                best_meta = dict(base_meta, epoch=epoch + 1, step=step, val=chosen, ema=ema is not None)
                path = checkpoints.save_best(ema.shadow if ema is not None else net, best_meta)
                log.info("  best last-exit top-1 %.2f: %s", best["metric"], path)
        if checkpoints and (last or (epoch + 1) % config["ckpt_interval"] == 0):
            last_saved = checkpoints.save_train_state(
                train_step, epoch + 1, dict(base_meta, step=step, val=result, ema_val=ema_result, best=best))
        metrics.write(record)
    if train_loader.skipped:
        log.warning("skipped %d corrupt image(s): %s", len(train_loader.skipped),
                    ", ".join(sorted(train_loader.skipped)[:20]))
    best_path = os.path.join(run_dir, "best.ckpt")
    return {"val": result, "ema_val": ema_result, "run_dir": run_dir, "best": best,
            "best_checkpoint": best_path if os.path.isfile(best_path) else None, "rank": rank}
