"""The training run behind train.py: device and ranks, data, model, optimizer, loop, checkpoints, logs.

Rank 0 writes everything in `output_dir`: `config.yaml` (the resolved config), `train.log`,
`metrics.jsonl` (step and epoch records), the training checkpoints and `best.ckpt`, each with its JSON,
every file all-or-nothing (src/atomic.py). It holds the directory's lock for the run (run_dir.py), and
SIGTERM/SIGINT end the run at a step boundary with a training state saved (stop.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time

import mindspore as ms
from mindspore import ParameterTuple, Tensor, nn, ops
from tqdm import tqdm

from ..atomic import append_line, remove_partials, write_text
from ..config import save_config
from ..data.pipeline import create_eval_loader, create_train_loader
from ..flops import exit_gflops
from ..models import DVT, CheckpointMismatch
from ..models.tokenizers import TokenPerformer
from ..models.weights import UnreadableCheckpoint
from .checkpoint import CheckpointManager, load_pretrained, load_train_state, restore_newest
from .evaluate import evaluate
from .inference import build_model, use_device
from .optim import AdamW, param_groups
from .run_dir import check_fresh, claim
from .schedule import cosine_schedule
from .stop import StopRequests, TrainingStopped
from .train_step import AccumulateGrads, DVTWithLoss, ModelEMA, TrainStep, loss_scale_sense

log = logging.getLogger("dvt")
MAX_SKIPPED_IN_A_ROW = 100
# Files in a run directory that belong to the launch, not to a run: msrun's per-rank logs and the console copy
# of scripts/run_standalone_train.sh. They stay in place when --overwrite moves a previous run aside.
LAUNCH_FILES = ("logs", "train_stdout.log")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf and loss scaling cannot recover it."""


def setup_device(config: dict) -> tuple[int, int]:
    """Graph mode on the configured device; with `distribute`, join the communication group."""
    use_device(config["device_target"])
    if config["deterministic"]:
        ms.set_context(deterministic="ON")
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


def setup_logging(rank: int) -> None:
    """The run's log on stdout (prefixed with the rank on ranks other than 0)."""
    log.setLevel(logging.INFO)
    log.handlers.clear()
    log.propagate = False
    prefix = f"[rank {rank}] " if rank else ""
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(logging.Formatter(prefix + "%(message)s"))
    log.addHandler(stream)


def add_log_file(run_dir: str) -> None:
    """Also log to `run_dir`/train.log, once the run owns the directory."""
    handler = logging.FileHandler(os.path.join(run_dir, "train.log"), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)


def apply_amp(net: DVT, level: str) -> None:
    """fp16 compute per `amp_level`, keeping LayerNorm and the performer (its exp overflows) in fp32."""
    if level == "O0":
        return
    ms.amp.auto_mixed_precision(net, amp_level=level, dtype=ms.float16)
    for _, cell in net.cells_and_names():
        if isinstance(cell, (nn.LayerNorm, TokenPerformer)):
            cell.to_float(ms.float32)


class MetricsLog:
    """JSON-lines records of steps and epochs (rank 0 only); each record is appended whole or not at all."""

    def __init__(self, path: str | None):
        self.path = path

    def write(self, record: dict) -> None:
        if self.path:
            append_line(self.path, json.dumps(record))

    def keep_until(self, step: int) -> None:
        """Drop the records after `step` (a resumed run writes them again) and a last line a kill cut short."""
        if not self.path or not os.path.isfile(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("step", 0) <= step:
                    kept.append(json.dumps(record) + "\n")
        write_text(self.path, "".join(kept))


def _format_accuracy(result: dict) -> str:
    return " / ".join(f"{acc:.2f}" for acc in result["top1"])


class DeviceReadings:
    """The per-update vectors (loss, overflowed, loss scale) the train step leaves on the device, read in one
    go when the host needs them (every log_interval updates, before a checkpoint, at the epoch's end), so the
    device queue is not stalled every step. Also keeps the epoch's loss sum and the skipped-update counts."""

    def __init__(self, config: dict, metrics: MetricsLog):
        self.dynamic = config["loss_scale_type"] == "dynamic"
        self.log_every = config["log_interval"]
        self.metrics = metrics
        self.pending: list[tuple[int, int, float, Tensor]] = []
        self.loss_sum, self.loss_count, self.skipped_total, self.skipped_in_a_row = 0.0, 0, 0, 0

    def add(self, epoch: int, step: int, lr: float, vector: Tensor) -> None:
        self.pending.append((epoch, step, lr, vector))

    def read(self, last_saved: str | None) -> None:
        """Read what is pending, check it, write the step records that are due (`last_saved` goes into the
        message if the loss diverged)."""
        if not self.pending:
            return
        values = ops.stack([vector for *_, vector in self.pending]).asnumpy()
        for (epoch, step, lr, _), (loss, overflowed, loss_scale) in zip(self.pending, values, strict=True):
            overflowed = bool(overflowed) or not math.isfinite(loss)
            if overflowed:
                self.skipped_total += 1
                self.skipped_in_a_row += 1
                if not self.dynamic or self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                    self.pending.clear()
                    raise TrainingDiverged(
                        f"the loss is {loss} at epoch {epoch + 1}, step {step} (lr {lr:.3g}); stopped without "
                        f"saving. The last good checkpoint is {last_saved or 'none (nothing was saved)'}. Lower lr, "
                        "set clip_grad, or use loss_scale_type: dynamic for fp16.")
            else:
                self.skipped_in_a_row = 0
                self.loss_sum += float(loss)
                self.loss_count += 1
            if step % self.log_every == 0:
                self.metrics.write({"type": "step", "epoch": epoch + 1, "step": step, "lr": lr, "loss": float(loss),
                               "loss_scale": float(loss_scale), "overflow": overflowed})
        self.pending.clear()

    def epoch_state(self) -> dict:
        return {"loss_sum": self.loss_sum, "loss_count": self.loss_count, "skipped_total": self.skipped_total,
                "skipped_in_a_row": self.skipped_in_a_row}

    def restore(self, state: dict) -> None:
        self.loss_sum, self.loss_count = state["loss_sum"], state["loss_count"]
        self.skipped_total, self.skipped_in_a_row = state["skipped_total"], state["skipped_in_a_row"]

    def end_epoch(self) -> float:
        """The epoch's mean loss over applied updates; starts the next epoch's sum."""
        mean = self.loss_sum / max(self.loss_count, 1)
        self.loss_sum, self.loss_count = 0.0, 0
        return mean


def _restore(config: dict, run_dir: str, train_step: nn.Cell,
             spec_dict: dict) -> tuple[str | None, dict | None, list[str]]:
    """The training state to continue from: `resume` itself, or with `auto` the newest in the run directory
    that loads whole. Returns (its path, its JSON, the damaged states skipped on the way); (None, None, [])
    starts from scratch, which `auto` does only when the directory holds no training state at all."""
    resume = config["resume"]
    if not resume:
        return None, None, []
    if resume != "auto":
        return resume, load_train_state(train_step, resume, spec_dict, config["model"]), []
    states = CheckpointManager(run_dir, config["model"], config["keep_checkpoints"]).train_states()
    path, meta, skipped = restore_newest(train_step, [p for _, p in reversed(states)], spec_dict, config["model"])
    for reason in skipped.values():
        log.warning("resume auto: skipped a damaged training state: %s", reason)
    if path is None and skipped:
        raise UnreadableCheckpoint(f"resume auto: none of the {len(skipped)} training state(s) in {run_dir} "
                                   "loads (above); move them away to start anew, or resume a copy you trust")
    if path is None:
        log.info("resume auto: no training state in %s, starting from scratch", run_dir)
    return path, meta, list(skipped)


def train(config: dict) -> dict:
    """Run a whole training; returns the final validation results and where the checkpoints are.

    Everything that can be checked is checked before the run directory is touched: a failing config, data or
    model leaves nothing behind. Rank 0 then claims the directory (see run_dir.py) and holds it until the end.
    """
    rank, group_size = setup_device(config)
    run_dir = os.path.abspath(config["output_dir"])
    setup_logging(rank)
    ms.set_seed(config["seed"])
    is_main = rank == 0
    resuming = bool(config["resume"])
    check_fresh(run_dir, resuming, config["overwrite"])  # on every rank, so that all of them stop

    # The model first, for img_size; the data then fixes num_classes, which must agree with the config.
    net = build_model(config, config["num_classes"])
    img_size = net.spec.img_size
    train_loader = create_train_loader(config, img_size, rank, group_size)
    val_loader = create_eval_loader(config, img_size, rank, group_size)
    if train_loader.num_classes != config["num_classes"]:
        raise ValueError(f"the {config['dataset']} data has {train_loader.num_classes} classes but num_classes "
                         f"is {config['num_classes']}; set num_classes: {train_loader.num_classes}")
    if config["pretrained"]:
        load_pretrained(net, config["pretrained"])
    if group_size > 1:
        replicate_rank_zero(net, rank)
    apply_amp(net, config["amp_level"])

    accum = config["accum_steps"]
    updates_per_epoch = train_loader.batches_per_epoch // accum
    schedule = cosine_schedule(config["lr"], config["epochs"], updates_per_epoch, config["warmup_epochs"],
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
    train_step = TrainStep(DVTWithLoss(net), optimizer, scale, config["clip_grad"], ema, accum)

    # The run directory's own files (msrun's logs/, the launch script's console copy) stay when a run is moved.
    lock = claim(run_dir, resuming, config["overwrite"], keep=LAUNCH_FILES) if is_main else None
    try:
        if is_main:
            add_log_file(run_dir)
            if lock.taken_over:
                log.warning("took over the lock of a run that is gone (%s)", lock.taken_over)
            if lock.moved_to:
                log.warning("moved the run that was in %s to %s (--overwrite)", run_dir, lock.moved_to)
        if config["pretrained"]:
            log.info("started from %s", config["pretrained"])
        with StopRequests(group_size) as stops:
            return _run(config, rank, group_size, run_dir, net, train_loader, val_loader, train_step, schedule,
                        updates_per_epoch, stops)
    except TrainingStopped as stopped:
        log.warning("%s", stopped)
        raise
    except Exception as err:  # the run's log keeps the reason it ended; train.py prints it and exits 1
        log.error("%s", err)
        raise
    finally:
        if lock is not None:
            lock.release()


def _run(config: dict, rank: int, group_size: int, run_dir: str, net: DVT, train_loader, val_loader,
         train_step: TrainStep, schedule, updates_per_epoch: int, stops: StopRequests) -> dict:
    """Restore, then the epochs: the part of `train` that runs with the run directory claimed."""
    is_main = rank == 0
    accum = config["accum_steps"]
    ema = train_step.ema
    accumulate = AccumulateGrads(train_step) if accum > 1 else None
    total_epochs = config["epochs"] + config["cooldown_epochs"]
    spec_dict = net.spec.to_dict()
    gflops = exit_gflops(net.spec)
    best = {"metric": -1.0, "epoch": None}
    metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl") if is_main else None)
    readings = DeviceReadings(config, metrics)
    # Nothing is written into the run before its state is restored: a resume that fails changes nothing.
    resume, meta, damaged = _restore(config, run_dir, train_step, spec_dict)
    if resume:
        saved_updates = meta.get("updates_per_epoch", updates_per_epoch)
        if saved_updates != updates_per_epoch:
            raise CheckpointMismatch(
                f"{resume} was saved by a run of {saved_updates} updates per epoch, this one has {updates_per_epoch} "
                "(batch_size, accum_steps, the number of devices or max_steps_per_epoch differ); resume with the "
                "same ones, or start from its weights with --pretrained")
        best = meta.get("best", best)
        if meta.get("epoch_state"):
            readings.restore(meta["epoch_state"])
        log.info("resumed %s: epoch %d done, step %d", resume, meta["epoch"], meta["step"])

    checkpoints = None
    if is_main or config["ckpt_all_ranks"]:
        own_dir = run_dir if is_main else os.path.join(run_dir, f"rank_{rank}")
        checkpoints = CheckpointManager(own_dir, config["model"], config["keep_checkpoints"])
    if is_main:
        metrics.keep_until(meta["step"] if resume else 0)
        for stale in remove_partials(run_dir):
            log.info("removed %s, a partial file of an interrupted run", stale)
        save_config(dict(config, overwrite=False), os.path.join(run_dir, "config.yaml"))

    base_meta = {"model": config["model"], "spec": spec_dict, "num_classes": config["num_classes"],
                 "grids": list(net.spec.grids), "exit_gflops": gflops, "img_size": net.spec.img_size,
                 "mean": config["mean"], "std": config["std"], "crop_pct": config["crop_pct"],
                 "interpolation": config["interpolation"], "updates_per_epoch": updates_per_epoch,
                 "dataset": config["dataset"],
                 "data_path": os.path.abspath(config["data_path"]) if config["data_path"] else None}
    log.info("%s: %d exits %s, %.4g GFLOPs per exit %s; %d images per rank and epoch, %d updates/epoch "
             "(%d x %d images per rank each) x %d epochs, %d rank(s)", config["model"], net.num_exits,
             net.spec.grids, gflops[-1], [round(g, 4) for g in gflops], train_loader.num_samples,
             updates_per_epoch, accum, config["batch_size"], total_epochs, group_size)

    show_bar = is_main and config["progress"] and sys.stderr.isatty()
    update_images = config["batch_size"] * accum * group_size
    result, ema_result = None, None
    last_saved = resume
    # The schedule index, kept on the host: every update advances it, applied or skipped (see TrainStep).
    step = int(train_step.optimizer.global_step.asnumpy().reshape(-1)[0])
    stream = train_loader.batches(start=step * accum)

    saved_step = step if resume else None

    def save_state(epoch: int, mid_epoch: bool) -> str:
        nonlocal saved_step
        saved_step = step
        if is_main:  # by now every rank has restored (updates ran since), so the skipped states can move
            while damaged:
                log.warning("kept the damaged %s as %s", damaged[0], checkpoints.set_aside(damaged.pop(0)))
        return checkpoints.save_train_state(
            train_step, epoch, dict(base_meta, step=step, val=result, ema_val=ema_result, best=best,
                                    epoch_state=readings.epoch_state()), mid_epoch)

    def stop(signum: int, epoch: int, mid_epoch: bool) -> TrainingStopped:
        """Save where training stopped (unless that state is on disk already), then say how to go on."""
        nonlocal last_saved
        readings.read(last_saved)
        if checkpoints and config["checkpoint_on_stop"] and saved_step != step:
            last_saved = save_state(epoch, mid_epoch)
        stops.barrier()
        where = f"in epoch {epoch + 1}" if mid_epoch else f"after epoch {epoch}"
        state = last_saved if checkpoints else f"rank 0's, in {run_dir}"
        return TrainingStopped(signum, f"stopped by {signal.Signals(signum).name} {where}, step {step}; last "
                                       f"training state: {state or 'none'}; to continue, run the same command "
                                       "with --resume auto")

    for epoch in range(step // updates_per_epoch, total_epochs):
        train_step.set_train(True)
        if accumulate is not None:
            accumulate.set_train(True)
        started = time.perf_counter()
        first_update = step - epoch * updates_per_epoch
        bar = tqdm(total=updates_per_epoch, initial=first_update, desc=f"epoch {epoch + 1}/{total_epochs}",
                   disable=not show_bar, dynamic_ncols=True, leave=False)
        for _ in range(first_update, updates_per_epoch):
            lr = float(schedule[min(step, len(schedule) - 1)])
            for _ in range(accum - 1):
                accumulate(*next(stream))
            readings.add(epoch, step + 1, lr, train_step(*next(stream)))
            step += 1
            bar.update(1)
            at_log = step % config["log_interval"] == 0
            if at_log:
                readings.read(last_saved)
                rate = update_images * (bar.n - first_update) / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix(lr=f"{lr:.3g}", img_s=f"{rate:.1f}")
            inside = step % updates_per_epoch != 0
            if checkpoints and config["save_interval_steps"] and step % config["save_interval_steps"] == 0 and inside:
                readings.read(last_saved)
                last_saved = save_state(epoch, mid_epoch=True)
            if inside and (signum := stops.signum(sync_point=at_log)):
                bar.close()
                raise stop(signum, epoch, mid_epoch=True)
        bar.close()
        readings.read(last_saved)
        elapsed = time.perf_counter() - started
        train_loss = readings.end_epoch()
        last = epoch + 1 == total_epochs
        skipped = len(train_loader.skipped)
        log.info("epoch %d/%d: loss %.4f, lr %.3g, %.1f img/s, %.0f s%s", epoch + 1, total_epochs, train_loss,
                 float(schedule[min(step, len(schedule)) - 1]),
                 update_images * (updates_per_epoch - first_update) / elapsed, elapsed,
                 f", {skipped} corrupt image(s) skipped so far" if skipped else "")
        record = {"type": "epoch", "epoch": epoch + 1, "step": step, "train_loss": train_loss,
                  "overflow_steps": readings.skipped_total, "seconds": elapsed}
        if last or (epoch + 1) % config["eval_interval"] == 0:
            result = evaluate(net, val_loader.batches(), net.num_exits, group_size)
            log.info("  val top-1 per exit: %s (%d images)", _format_accuracy(result), result["count"])
            record["val"] = result
            if ema is not None:
                ema_result = evaluate(ema.shadow, val_loader.batches(), net.num_exits, group_size)
                log.info("  EMA val top-1 per exit: %s", _format_accuracy(ema_result))
                record["ema_val"] = ema_result
            chosen = ema_result if ema is not None else result
            if checkpoints and chosen["top1"][-1] > best["metric"]:
                best = {"metric": chosen["top1"][-1], "epoch": epoch + 1}
                best_meta = dict(base_meta, epoch=epoch + 1, step=step, val=chosen, ema=ema is not None)
                path = checkpoints.save_best(ema.shadow if ema is not None else net, best_meta)
                log.info("  best last-exit top-1 %.2f: %s", best["metric"], path)
        if checkpoints and (last or (epoch + 1) % config["ckpt_interval"] == 0):
            last_saved = save_state(epoch + 1, mid_epoch=False)
        metrics.write(record)
        if not last and (signum := stops.signum(sync_point=True)):
            raise stop(signum, epoch + 1, mid_epoch=False)
    if train_loader.skipped:
        log.warning("skipped %d corrupt image(s): %s", len(train_loader.skipped),
                    ", ".join(sorted(train_loader.skipped)[:20]))
    best_path = os.path.join(run_dir, "best.ckpt")
    return {"val": result, "ema_val": ema_result, "run_dir": run_dir, "best": best,
            "best_checkpoint": best_path if os.path.isfile(best_path) else None, "rank": rank}
