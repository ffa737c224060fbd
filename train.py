"""Train a DVT: `python train.py --config_path config/demo.yaml [--KEY VALUE ...]`.

Every key of the recipe can be overridden on the command line (`--lr 1e-3 --epochs 5`); an unknown
key is an error. Data-parallel runs are started by scripts/run_distribute_train.sh (msrun or a rank table).
Exit status: 0 done, 1 an error (one line on stderr and in train.log), 128 + signal number (143 for SIGTERM,
130 for SIGINT) when a signal stopped training at a step boundary.
"""

import signal
import sys


def main(argv: list[str] | None = None) -> int:
    # Imported here, so that the command line can hold SIGINT before MindSpore starts its threads (below).
    from src.config import ConfigError, resolve
    from src.data.sources import DataError
    from src.engine.run_dir import RunDirectoryInUse
    from src.engine.stop import TrainingStopped
    from src.engine.trainer import TrainingDiverged, train
    from src.models import CheckpointMismatch

    try:
        config, _ = resolve(argv, __doc__.splitlines()[0])
        summary = train(config)
    except TrainingStopped as stopped:
        print(f"train.py: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except (ConfigError, DataError, CheckpointMismatch, TrainingDiverged, RunDirectoryInUse, OSError,
            ValueError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 1
    if summary["rank"] == 0 and summary["val"]:
        final = summary["ema_val"] or summary["val"]
        kind = "EMA " if summary["ema_val"] else ""
        print(f"\n{kind}validation top-1 per exit: " + " / ".join(f"{a:.2f}%" for a in final["top1"]))
        print(f"best checkpoint: {summary['best_checkpoint']} (epoch {summary['best']['epoch']})")
    if summary["rank"] == 0:
        print(f"run directory: {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    # MindSpore turns SIGINT into SIGTERM while it runs graphs; held from here, a Ctrl+C reaches training
    # between two updates as itself (src/engine/stop.py).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    sys.exit(main())
