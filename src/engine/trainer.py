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
from dataclasses import dataclass
from typing import Any

import mindspore as ms
from mindspore import ParameterTuple, Tensor, nn, ops
from tqdm import tqdm

from ..atomic import append_line, remove_partials, write_text
from ..config import save_config
from ..data.pipeline import create_eval_loader, create_train_loader
from ..metadata import model_meta
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


@dataclass
class RunParts:
    """What `train` builds and checks before it claims the run directory; a TrainingRun runs it."""

    config: dict
    rank: int
    group_size: int
    run_dir: str
    net: DVT
    train_loader: Any
    val_loader: Any  # None when eval_interval is 0: no validation during training
    train_step: TrainStep
    schedule: Any
    updates_per_epoch: int


def train(config: dict) -> dict:
    """Run a whole training; returns the final validation results and where the checkpoints are.

    Everything that can be checked is checked before the run directory is touched: a failing config, data or
    model leaves nothing behind. Rank 0 then claims the directory (see run_dir.py) and holds it until the end.
    """
    parts = _build(config)
    resuming = bool(config["resume"])
    is_main = parts.rank == 0
    # The run directory's own files (msrun's logs/, the launch script's console copy) stay when a run is moved.
    lock = claim(parts.run_dir, resuming, config["overwrite"], keep=LAUNCH_FILES) if is_main else None
    try:
        if is_main:
            add_log_file(parts.run_dir)
            if lock.taken_over:
                log.warning("took over the lock of a run that is gone (%s)", lock.taken_over)
            if lock.moved_to:
                log.warning("moved the run that was in %s to %s (--overwrite)", parts.run_dir, lock.moved_to)
        if config["pretrained"]:
            log.info("started from %s", config["pretrained"])
        with StopRequests(parts.group_size) as stops:
            return TrainingRun(parts, stops).run()
    except TrainingStopped as stopped:
        log.warning("%s", stopped)
        raise
    except Exception as err:  # the run's log keeps the reason it ended; train.py prints it and exits 1
        log.error("%s", err)
        raise
    finally:
        if lock is not None:
            lock.release()


def _build(config: dict) -> RunParts:
    """Device, model, data, optimizer and step, every input checked; nothing is written yet."""
    rank, group_size = setup_device(config)
    run_dir = os.path.abspath(config["output_dir"])
    setup_logging(rank)
    ms.set_seed(config["seed"])
    check_fresh(run_dir, bool(config["resume"]), config["overwrite"])  # on every rank, so that all of them stop

    # The model first, for img_size; the data then fixes num_classes, which must agree with the config.
    net = build_model(config, config["num_classes"])
    img_size = net.spec.img_size
    train_loader = create_train_loader(config, img_size, rank, group_size)
    val_loader = create_eval_loader(config, img_size, rank, group_size) if config["eval_interval"] else None
    if train_loader.num_classes != config["num_classes"]:
        raise ValueError(f"the {config['dataset']} data has {train_loader.num_classes} classes but num_classes "
                         f"is {config['num_classes']}; set num_classes: {train_loader.num_classes}")
    if config["pretrained"]:
        load_pretrained(net, config["pretrained"])
    if group_size > 1:
        replicate_rank_zero(net, rank)
    apply_amp(net, config["amp_level"])

    updates_per_epoch = train_loader.batches_per_epoch // config["accum_steps"]
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
    train_step = TrainStep(DVTWithLoss(net), optimizer, scale, config["clip_grad"], ema, config["accum_steps"])
    return RunParts(config, rank, group_size, run_dir, net, train_loader, val_loader, train_step, schedule,
                    updates_per_epoch)


def checkpoint_meta(config: dict, net: DVT, updates_per_epoch: int) -> dict:
    """What every checkpoint's JSON of this run records: the model, its spec and costs, eval preprocessing, data."""
    return {**model_meta(config["model"], net.spec),
            "mean": config["mean"], "std": config["std"], "crop_pct": config["crop_pct"],
            "interpolation": config["interpolation"], "updates_per_epoch": updates_per_epoch,
            "dataset": config["dataset"],
            "data_path": os.path.abspath(config["data_path"]) if config["data_path"] else None}


class TrainingRun:
    """The part of a training that runs with the run directory claimed: restore, the epochs, the states saved.

    `step` is the schedule index, kept on the host: every update advances it, applied or skipped (TrainStep).
    """

    def __init__(self, parts: RunParts, stops: StopRequests):
        self.parts, self.stops = parts, stops
        config, net = parts.config, parts.net
        self.config = config
        self.is_main = parts.rank == 0
        self.accum = config["accum_steps"]
        self.ema = parts.train_step.ema
        self.accumulate = AccumulateGrads(parts.train_step) if self.accum > 1 else None
        self.total_epochs = config["epochs"] + config["cooldown_epochs"]
        self.best = {"metric": -1.0, "epoch": None}
        self.metrics = MetricsLog(os.path.join(parts.run_dir, "metrics.jsonl") if self.is_main else None)
        self.readings = DeviceReadings(config, self.metrics)
        self.base_meta = checkpoint_meta(config, net, parts.updates_per_epoch)
        self.update_images = config["batch_size"] * self.accum * parts.group_size
        self.result, self.ema_result = None, None
        self.checkpoints = None
        self.damaged: list[str] = []
        self.last_saved: str | None = None
        self.saved_step: int | None = None
        self.step = 0

    def restore(self) -> None:
        """Continue from a training state if asked (nothing is written into the run before it is restored: a
        resume that fails changes nothing), then prepare the run directory."""
        parts, config = self.parts, self.config
        resume, meta, self.damaged = _restore(config, parts.run_dir, parts.train_step, self.base_meta["spec"])
        if resume:
            saved_updates = meta.get("updates_per_epoch", parts.updates_per_epoch)
            if saved_updates != parts.updates_per_epoch:
                raise CheckpointMismatch(
                    f"{resume} was saved by a run of {saved_updates} updates per epoch, this one has "
                    f"{parts.updates_per_epoch} (batch_size, accum_steps, the number of devices or "
                    "max_steps_per_epoch differ); resume with the same ones, or start from its weights with "
                    "--pretrained")
            self.best = meta.get("best", self.best)
            if meta.get("epoch_state"):
                self.readings.restore(meta["epoch_state"])
            log.info("resumed %s: epoch %d done, step %d", resume, meta["epoch"], meta["step"])
        if self.is_main or config["ckpt_all_ranks"]:
            own_dir = parts.run_dir if self.is_main else os.path.join(parts.run_dir, f"rank_{parts.rank}")
            self.checkpoints = CheckpointManager(own_dir, config["model"], config["keep_checkpoints"])
        if self.is_main:
            self.metrics.keep_until(meta["step"] if resume else 0)
            for stale in remove_partials(parts.run_dir):
                log.info("removed %s, a partial file of an interrupted run", stale)
            save_config(dict(config, overwrite=False), os.path.join(parts.run_dir, "config.yaml"))
        self.last_saved = resume
        self.step = int(parts.train_step.optimizer.global_step.asnumpy().reshape(-1)[0])
        self.saved_step = self.step if resume else None

    def run(self) -> dict:
        """Restore, then every epoch; returns the final results and where the best checkpoint is."""
        parts, config, net = self.parts, self.config, self.parts.net
        self.restore()
        gflops = self.base_meta["exit_gflops"]
        log.info("%s: %d exits %s, %.4g GFLOPs per exit %s; %d images per rank and epoch, %d updates/epoch "
                 "(%d x %d images per rank each) x %d epochs, %d rank(s)", config["model"], net.num_exits,
                 net.spec.grids, gflops[-1], [round(g, 4) for g in gflops], parts.train_loader.num_samples,
                 parts.updates_per_epoch, self.accum, config["batch_size"], self.total_epochs, parts.group_size)
        stream = parts.train_loader.batches(start=self.step * self.accum)
        for epoch in range(self.step // parts.updates_per_epoch, self.total_epochs):
            first_update, elapsed = self.train_epoch(epoch, stream)
            self.end_epoch(epoch, first_update, elapsed)
        skipped = parts.train_loader.skipped
        if skipped:
            log.warning("skipped %d corrupt image(s): %s", len(skipped), ", ".join(sorted(skipped)[:20]))
        best_path = os.path.join(parts.run_dir, "best.ckpt")
        return {"val": self.result, "ema_val": self.ema_result, "run_dir": parts.run_dir, "best": self.best,
                "best_checkpoint": best_path if os.path.isfile(best_path) else None, "rank": parts.rank}

    def train_epoch(self, epoch: int, stream) -> tuple[int, float]:
        """The updates of `epoch` still to do; returns where it started and how long it took."""
        parts, config = self.parts, self.config
        parts.train_step.set_train(True)
        if self.accumulate is not None:
            self.accumulate.set_train(True)
        started = time.perf_counter()
        first_update = self.step - epoch * parts.updates_per_epoch
        show_bar = self.is_main and config["progress"] and sys.stderr.isatty()
        bar = tqdm(total=parts.updates_per_epoch, initial=first_update, desc=f"epoch {epoch + 1}/{self.total_epochs}",
                   disable=not show_bar, dynamic_ncols=True, leave=False)
        for _ in range(first_update, parts.updates_per_epoch):
            lr = float(parts.schedule[min(self.step, len(parts.schedule) - 1)])
            for _ in range(self.accum - 1):
                self.accumulate(*next(stream))
            self.readings.add(epoch, self.step + 1, lr, parts.train_step(*next(stream)))
            self.step += 1
            bar.update(1)
            at_log = self.step % config["log_interval"] == 0
            if at_log:
                self.readings.read(self.last_saved)
                rate = self.update_images * (bar.n - first_update) / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix(lr=f"{lr:.3g}", img_s=f"{rate:.1f}")
            inside = self.step % parts.updates_per_epoch != 0
            interval = config["save_interval_steps"]
            if self.checkpoints and interval and self.step % interval == 0 and inside:
                self.readings.read(self.last_saved)
                self.last_saved = self.save_state(epoch, mid_epoch=True)
            if inside and (signum := self.stops.signum(sync_point=at_log)):
                bar.close()
                raise self.stop(signum, epoch, mid_epoch=True)
        bar.close()
        self.readings.read(self.last_saved)
        return first_update, time.perf_counter() - started

    def end_epoch(self, epoch: int, first_update: int, elapsed: float) -> None:
        """Log the epoch, validate when due (and keep the best), save the training state when due, stop if asked."""
        parts, config = self.parts, self.config
        train_loss = self.readings.end_epoch()
        last = epoch + 1 == self.total_epochs
        skipped = len(parts.train_loader.skipped)
        log.info("epoch %d/%d: loss %.4f, lr %.3g, %.1f img/s, %.0f s%s", epoch + 1, self.total_epochs, train_loss,
                 float(parts.schedule[min(self.step, len(parts.schedule)) - 1]),
                 self.update_images * (parts.updates_per_epoch - first_update) / elapsed, elapsed,
                 f", {skipped} corrupt image(s) skipped so far" if skipped else "")
        record = {"type": "epoch", "epoch": epoch + 1, "step": self.step, "train_loss": train_loss,
                  "overflow_steps": self.readings.skipped_total, "seconds": elapsed}
        interval = config["eval_interval"]
        if interval and (last or (epoch + 1) % interval == 0):
            self.validate(epoch, record)
        if self.checkpoints and (last or (epoch + 1) % config["ckpt_interval"] == 0):
            self.last_saved = self.save_state(epoch + 1, mid_epoch=False)
        self.metrics.write(record)
        if not last and (signum := self.stops.signum(sync_point=True)):
            raise self.stop(signum, epoch + 1, mid_epoch=False)

    def validate(self, epoch: int, record: dict) -> None:
        """Every exit's validation accuracy (and the EMA's) into `record`; a new best last exit saves best.ckpt."""
        parts, net, ema = self.parts, self.parts.net, self.ema
        self.result = evaluate(net, parts.val_loader.batches(), net.num_exits, parts.group_size)
        log.info("  val top-1 per exit: %s (%d images)", _format_accuracy(self.result), self.result["count"])
        record["val"] = self.result
        if ema is not None:
            self.ema_result = evaluate(ema.shadow, parts.val_loader.batches(), net.num_exits, parts.group_size)
            log.info("  EMA val top-1 per exit: %s", _format_accuracy(self.ema_result))
            record["ema_val"] = self.ema_result
        chosen = self.ema_result if ema is not None else self.result
        if self.checkpoints and chosen["top1"][-1] > self.best["metric"]:
            self.best = {"metric": chosen["top1"][-1], "epoch": epoch + 1}
            best_meta = dict(self.base_meta, epoch=epoch + 1, step=self.step, val=chosen, ema=ema is not None)
            path = self.checkpoints.save_best(ema.shadow if ema is not None else net, best_meta)
            log.info("  best last-exit top-1 %.2f: %s", self.best["metric"], path)

    def save_state(self, epoch: int, mid_epoch: bool) -> str:
        """A training state at the current step; the damaged states resume skipped are set aside first."""
        self.saved_step = self.step
        if self.is_main:  # by now every rank has restored (updates ran since), so the skipped states can move
            while self.damaged:
                damaged = self.damaged.pop(0)
                log.warning("kept the damaged %s as %s", damaged, self.checkpoints.set_aside(damaged))
        meta = dict(self.base_meta, step=self.step, val=self.result, ema_val=self.ema_result, best=self.best,
                    epoch_state=self.readings.epoch_state())
        return self.checkpoints.save_train_state(self.parts.train_step, epoch, meta, mid_epoch)

    def stop(self, signum: int, epoch: int, mid_epoch: bool) -> TrainingStopped:
        """Save where training stopped (unless that state is on disk already), then say how to go on."""
        self.readings.read(self.last_saved)
        if self.checkpoints and self.config["checkpoint_on_stop"] and self.saved_step != self.step:
            self.last_saved = self.save_state(epoch, mid_epoch)
        self.stops.barrier()
        where = f"in epoch {epoch + 1}" if mid_epoch else f"after epoch {epoch}"
        state = self.last_saved if self.checkpoints else f"rank 0's, in {self.parts.run_dir}"
        return TrainingStopped(signum, f"stopped by {signal.Signals(signum).name} {where}, step {self.step}; last "
                                       f"training state: {state or 'none'}; to continue, run the same command "
                                       "with --resume auto")
