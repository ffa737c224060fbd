# Sourced by the launch scripts and run.sh: the repo root, the venv on PATH, and shared argument handling.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -x "$repo/.venv/bin/python" ]; then export PATH="$repo/.venv/bin:$PATH"; fi  # msrun runs the `python` on PATH

# output_dir [--config_path F] [--KEY VALUE ...]: the run directory those arguments resolve to.
output_dir() {
  (cd "$repo" && python -c "import sys; from src.config import resolve; print(resolve(sys.argv[1:], '')[0]['output_dir'])" "$@")
}

# optional_data_and_device ARG...: for an optional positional DATA_PATH ("-": keep the recipe's) and
# DEVICE_TARGET, appends --data_path / --device_target to the array `args`; sets `consumed` to how many it took.
optional_data_and_device() {
  consumed=0
  if [ $# -ge 1 ] && [[ "$1" != --* ]]; then
    if [ "$1" != "-" ]; then
      local data
      data=$(realpath -m "$1")
      [ -e "$data" ] || { echo "error: dataset path not found: $data" >&2; exit 1; }
      args+=(--data_path "$data")
    fi
    shift
    consumed=1
  fi
  if [ $# -ge 1 ] && [[ "$1" != --* ]]; then
    args+=(--device_target "$1")
    consumed=$((consumed + 1))
  fi
}
