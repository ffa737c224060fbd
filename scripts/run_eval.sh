#!/usr/bin/env bash
# usage: bash scripts/run_eval.sh CONFIG_PATH CHECKPOINT_PATH [DATA_PATH|-] [DEVICE_TARGET] [eval.py --FLAG VALUE ...]
#   e.g. bash scripts/run_eval.sh config/dvt_t2t_vit_12.yaml runs/dvt_t2t_vit_12/best.ckpt /data/imagenet GPU
#        bash scripts/run_eval.sh config/demo.yaml runs/demo/best.ckpt - CPU --budgets 0.2x,0.5x
# Every exit's accuracy, thresholds for the budgets (default: the 59 official ones), the accuracy-vs-GFLOPs
# curve. Outputs and eval_stdout.log go to eval.py's eval folder: eval/ beside the checkpoint, or --output_dir;
# an earlier solve's results there are moved to <folder>.replaced-<time>/ (eval.py says so), never overwritten.
set -euo pipefail
usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 1; }
[ $# -ge 2 ] || usage
source "$(dirname "$0")/common.sh"
config=$(realpath -m "$1") ckpt=$(realpath -m "$2"); shift 2
[ -f "$config" ] || { echo "error: config file not found: $config" >&2; exit 1; }
[ -f "$ckpt" ] || { echo "error: checkpoint not found: $ckpt" >&2; exit 1; }
args=(--config_path "$config" --checkpoint_path "$ckpt")
optional_data_and_device "$@"
shift "$consumed"
cd "$repo"
out=$(dirname "$ckpt")/eval
for ((i = 1; i < $#; i++)); do
  [ "${!i}" = --output_dir ] && { next=$((i + 1)); out=$(realpath -m "${!next}"); }
done
mkdir -p "$out"
python eval.py "${args[@]}" --output_dir "$out" "$@" 2>&1 | tee -a "$out/eval_stdout.log"
