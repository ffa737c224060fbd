#!/usr/bin/env bash
# usage: bash scripts/run_distribute_train.sh DEVICE_NUM DATA_PATH CONFIG_PATH [DEVICE_TARGET] [train.py --KEY VALUE ...]
#        bash scripts/run_distribute_train.sh RANK_TABLE_FILE DATA_PATH CONFIG_PATH [train.py --KEY VALUE ...]
#   e.g. bash scripts/run_distribute_train.sh 8 /data/imagenet config/dvt_t2t_vit_12.yaml Ascend
#        bash scripts/run_distribute_train.sh /path/rank_table_8p.json /data/imagenet config/dvt_t2t_vit_12.yaml
# Data-parallel training with mean gradients. With DEVICE_NUM, msrun starts the workers (Ascend, GPU or CPU;
# MASTER_PORT, default 8118); with a RANK_TABLE_FILE (Ascend), one process per device of the table. Each rank
# logs to OUTPUT_DIR/logs/worker_<rank>.log (OUTPUT_DIR: the recipe's output_dir); rank 0 writes checkpoints.
set -euo pipefail
usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 1; }
[ $# -ge 3 ] || usage
source "$(dirname "$0")/common.sh"
first=$1 data=$(realpath -m "$2") config=$(realpath -m "$3"); shift 3
[ -e "$data" ] || { echo "error: dataset path not found: $data" >&2; exit 1; }
[ -f "$config" ] || { echo "error: config file not found: $config" >&2; exit 1; }
args=(--config_path "$config" --data_path "$data" --distribute true)
cd "$repo"
if [[ "$first" =~ ^[0-9]+$ ]]; then
  [ "$first" -ge 1 ] || usage
  if [ $# -ge 1 ] && [[ "$1" != --* ]]; then args+=(--device_target "$1"); shift; fi
  out=$(output_dir "${args[@]}" "$@")
  mkdir -p "$out/logs"
  exec msrun --worker_num="$first" --local_worker_num="$first" --master_port="${MASTER_PORT:-8118}" \
    --log_dir="$out/logs" --join=True train.py "${args[@]}" "$@"
fi
table=$(realpath -m "$first")
[ -f "$table" ] || { echo "error: RANK_TABLE_FILE not found: $table" >&2; exit 1; }
device_num=$(python -c "import json, sys; t = json.load(open(sys.argv[1])); \
print(sum(len(s['device']) for s in t['server_list']))" "$table")
args+=(--device_target Ascend)
out=$(output_dir "${args[@]}" "$@")
mkdir -p "$out/logs"
export RANK_TABLE_FILE="$table" RANK_SIZE="$device_num"
pids=()
for ((rank = 0; rank < device_num; rank++)); do
  RANK_ID=$rank DEVICE_ID=$rank python train.py "${args[@]}" "$@" > "$out/logs/worker_$rank.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ "$status" = 0 ] || echo "a worker failed: see $out/logs/worker_<rank>.log" >&2
exit "$status"
