#!/usr/bin/env bash
# usage: bash scripts/run_distribute_train.sh WORKER_NUM DATA_PATH CONFIG_PATH [DEVICE_TARGET] [train.py --KEY VALUE ...]
#        bash scripts/run_distribute_train.sh RANK_TABLE_FILE DATA_PATH CONFIG_PATH [train.py --KEY VALUE ...]
# Data-parallel training with mean gradients; run the same command on every node. Each rank logs to
# OUTPUT_DIR/logs/worker_<global rank>.log (OUTPUT_DIR: the recipe's output_dir, best on a filesystem all nodes
# share); rank 0 writes the run directory. --dry_run (anywhere in the arguments) or DRY_RUN=1 checks the arguments
# and prints this node's ranks and the command, starting and creating nothing.
# WORKER_NUM, the workers of all nodes: msrun starts this node's (Ascend, GPU or CPU), as set by
#   LOCAL_WORKER_NUM  workers on this node (default WORKER_NUM: one node); WORKER_NUM must be a multiple of it
#   NODE_RANK         this node, 0 .. WORKER_NUM/LOCAL_WORKER_NUM-1 (default 0); its worker i runs global rank
#                     NODE_RANK*LOCAL_WORKER_NUM+i on device i
#   MASTER_ADDR       the address of the node that runs msrun's scheduler (default 127.0.0.1; use node 0's)
#   MASTER_PORT       the scheduler's port (default 8118); CLUSTER_TIME_OUT: seconds to wait for all nodes (600)
# RANK_TABLE_FILE (Ascend HCCL, v1.0): one process per device of this server, with the table's rank_id (RANK_ID)
# and device_id (DEVICE_ID). SERVER_ID picks the server: a server_id of the table, else a 0-based index into
# server_list; unset, the server whose server_id is this host's name or one of its addresses.
#   e.g. bash scripts/run_distribute_train.sh 8 /data/imagenet config/dvt_t2t_vit_12.yaml Ascend
#   2 nodes x 8 Ascend devices, node 0 at 10.0.0.1 (on node 0, then on node 1):
#        LOCAL_WORKER_NUM=8 MASTER_ADDR=10.0.0.1 NODE_RANK=0 bash scripts/run_distribute_train.sh 16 /data/imagenet config/dvt_t2t_vit_12.yaml Ascend
#        LOCAL_WORKER_NUM=8 MASTER_ADDR=10.0.0.1 NODE_RANK=1 bash scripts/run_distribute_train.sh 16 /data/imagenet config/dvt_t2t_vit_12.yaml Ascend
#   2 nodes x 4 GPUs, node 0 at 10.0.0.1 (on node 0, then on node 1):
#        LOCAL_WORKER_NUM=4 MASTER_ADDR=10.0.0.1 NODE_RANK=0 bash scripts/run_distribute_train.sh 8 /data/imagenet config/dvt_t2t_vit_12.yaml GPU
#        LOCAL_WORKER_NUM=4 MASTER_ADDR=10.0.0.1 NODE_RANK=1 bash scripts/run_distribute_train.sh 8 /data/imagenet config/dvt_t2t_vit_12.yaml GPU
#   a rank table, on every server of it:
#        bash scripts/run_distribute_train.sh /path/rank_table_16p.json /data/imagenet config/dvt_t2t_vit_12.yaml
set -euo pipefail
usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 1; }
dry_run=${DRY_RUN:-0} kept=()
[[ "$dry_run" =~ ^[01]$ ]] || { echo "error: DRY_RUN must be 0 or 1, got '$dry_run'" >&2; exit 1; }
for arg in "$@"; do
  if [ "$arg" = --dry_run ]; then dry_run=1; else kept+=("$arg"); fi
done
set -- "${kept[@]}"
[ $# -ge 3 ] || usage
source "$(dirname "$0")/common.sh"
first=$1 data=$(realpath -m "$2") config=$(realpath -m "$3"); shift 3
[ -e "$data" ] || { echo "error: dataset path not found: $data" >&2; exit 1; }
[ -f "$config" ] || { echo "error: config file not found: $config" >&2; exit 1; }
args=(--config_path "$config" --data_path "$data" --distribute true)
cd "$repo"
if [[ "$first" =~ ^[0-9]+$ ]]; then
  if [ $# -ge 1 ] && [[ "$1" != --* ]]; then args+=(--device_target "$1"); shift; fi
  local_num=${LOCAL_WORKER_NUM:-$first} node_rank=${NODE_RANK:-0} addr=${MASTER_ADDR:-127.0.0.1}
  port=${MASTER_PORT:-8118} time_out=${CLUSTER_TIME_OUT:-600}
  plan=$(python scripts/launch_plan.py msrun "$first" "$local_num" "$node_rank" "$port" "$time_out")
  out=$(output_dir "${args[@]}" "$@")
  out=$(realpath -m "$out")
  # msrun names each log after the worker's global rank once --node_rank is set (MindSpore msrun docs, --log_dir).
  cmd=(msrun --worker_num="$first" --local_worker_num="$local_num" --master_addr="$addr" --master_port="$port"
       --node_rank="$node_rank" --cluster_time_out="$time_out" --log_dir="$out/logs" --join=True
       train.py "${args[@]}" "$@")
  if [ "$dry_run" = 1 ]; then
    echo "msrun node $node_rank of $((first / local_num)), scheduler $addr:$port: $local_num of $first workers"
    while read -r rank device; do echo "rank $rank device $device log $out/logs/worker_$rank.log"; done <<< "$plan"
    printf -v line '%q ' "${cmd[@]}"
    echo "command: ${line% }"
    exit 0
  fi
  mkdir -p "$out/logs"
  # msrun answers Ctrl+C by killing its workers outright and does not handle SIGTERM at all (the workers, each
  # in a session of its own, would train on). So msrun gets its own session too, and this script hands
  # SIGTERM and SIGINT to the workers (MS_ROLE=MS_WORKER; not the scheduler), which stop together at a step
  # boundary and save a training state (train.py); then it exits 128 + the signal's number.
  setsid "${cmd[@]}" &
  launcher=$! stopped=""
  # Killed outright (SIGKILL to this script's process group, as `timeout -s KILL` does), this script cannot
  # pass anything on, and msrun's session would train on: a watcher in a session of its own then kills msrun,
  # its scheduler and its workers.
  setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done
                  kill -0 "$2" 2>/dev/null && { pkill -KILL -P "$2"; kill -KILL "$2"; }' _ $$ "$launcher" \
    < /dev/null > /dev/null 2>&1 &
  watcher=$!
  to_workers() {
    stopped=$1
    for pid in $(pgrep -P "$launcher" || true); do
      if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx MS_ROLE=MS_WORKER; then
        kill -s "$1" "$pid" || true
      fi
    done
  }
  trap 'to_workers TERM' TERM
  trap 'to_workers INT' INT
  status=0
  while :; do
    wait "$launcher" && status=0 || status=$?
    kill -0 "$launcher" 2>/dev/null || break  # a signal ended the wait, not msrun
  done
  kill "$watcher" 2>/dev/null || true
  if [ -n "$stopped" ]; then
    echo "stopped by SIG$stopped: the workers stopped at one step boundary (see $out/logs); to continue, run the" \
      "same command with --resume auto" >&2
    [ "$stopped" = TERM ] && exit 143 || exit 130
  fi
  exit "$status"
fi
table=$(realpath -m "$first")
[ -f "$table" ] || { echo "error: RANK_TABLE_FILE not found: $table" >&2; exit 1; }
plan=$(python scripts/launch_plan.py ranktable "$table" ${SERVER_ID:+"$SERVER_ID"})
read -r _ _ server rank_size <<< "$plan"
args+=(--device_target Ascend)
out=$(output_dir "${args[@]}" "$@")
out=$(realpath -m "$out")
if [ "$dry_run" = 1 ]; then
  echo "rank table $table: server $server, $(wc -l <<< "$plan") of $rank_size ranks"
  while read -r rank device server _; do
    echo "rank $rank device $device server $server log $out/logs/worker_$rank.log"
  done <<< "$plan"
  printf -v line '%q ' python train.py "${args[@]}" "$@"
  echo "command: RANK_TABLE_FILE=$table RANK_SIZE=$rank_size RANK_ID=<rank> DEVICE_ID=<device> ${line% }"
  exit 0
fi
mkdir -p "$out/logs"
export RANK_TABLE_FILE="$table" RANK_SIZE="$rank_size"
pids=() stopped=""
while read -r rank device _ _; do
  RANK_ID=$rank DEVICE_ID=$device python train.py "${args[@]}" "$@" < /dev/null > "$out/logs/worker_$rank.log" 2>&1 &
  pids+=($!)
done <<< "$plan"
# SIGTERM and SIGINT go to every worker, which stop together at a step boundary (train.py).
trap 'stopped=TERM; kill -s TERM "${pids[@]}" 2>/dev/null || true' TERM
trap 'stopped=INT; kill -s INT "${pids[@]}" 2>/dev/null || true' INT
status=0
for pid in "${pids[@]}"; do
  while :; do
    wait "$pid" && code=0 || code=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  [ "$code" = 0 ] || status=1
done
if [ -n "$stopped" ]; then
  echo "stopped by SIG$stopped: see $out/logs; to continue, run the same command with --resume auto" >&2
  [ "$stopped" = TERM ] && exit 143 || exit 130
fi
[ "$status" = 0 ] || echo "a worker failed: see $out/logs/worker_<rank>.log" >&2
exit "$status"
