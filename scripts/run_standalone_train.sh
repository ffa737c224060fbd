#!/usr/bin/env bash
# usage: bash scripts/run_standalone_train.sh CONFIG_PATH [DATA_PATH|-] [DEVICE_TARGET] [train.py --KEY VALUE ...]
#   e.g. bash scripts/run_standalone_train.sh config/dvt_t2t_vit_12.yaml /data/imagenet Ascend
#        bash scripts/run_standalone_train.sh config/demo.yaml - CPU --epochs 5
# One process on one device (DEVICE_ID selects the card on Ascend/GPU, default 0). DATA_PATH "-" keeps the
# recipe's. The console output also goes to OUTPUT_DIR/train_stdout.log (OUTPUT_DIR: the recipe's output_dir).
set -euo pipefail
usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 1; }
[ $# -ge 1 ] || usage
repo=$(cd "$(dirname "$0")/.." && pwd)
config=$(realpath -m "$1"); shift
[ -f "$config" ] || { echo "error: config file not found: $config" >&2; exit 1; }
args=(--config_path "$config")
if [ $# -ge 1 ] && [[ "$1" != --* ]]; then
  if [ "$1" != "-" ]; then
    data=$(realpath -m "$1")
    [ -e "$data" ] || { echo "error: dataset path not found: $data" >&2; exit 1; }
    args+=(--data_path "$data")
  fi
  shift
fi
if [ $# -ge 1 ] && [[ "$1" != --* ]]; then args+=(--device_target "$1"); shift; fi
[ -x "$repo/.venv/bin/python" ] && export PATH="$repo/.venv/bin:$PATH"
export DEVICE_ID="${DEVICE_ID:-0}"
cd "$repo"
out=$(python -c "import sys; from src.config import resolve; print(resolve(sys.argv[1:], '')[0]['output_dir'])" \
      "${args[@]}" "$@")
mkdir -p "$out"
python train.py "${args[@]}" "$@" 2>&1 | tee -a "$out/train_stdout.log"
