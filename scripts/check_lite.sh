#!/usr/bin/env bash
# MindSpore Lite 2.0 on our ONNX stages, checked for real. NOT a CI test: the first run downloads the
# mindspore-lite 2.0.0 wheel (168 MB, 483 MB unpacked), the only Lite on the package index.
#
# usage: bash scripts/check_lite.sh [WORK_DIR]
#
# The wheel is for CPython 3.7 only, so it is never installed: it is downloaded once with pip (no dependencies)
# into $DVT_LITE_CACHE (default ~/.cache/dvt_mindspore/lite), unpacked there, and its C++ library drives
# scripts/lite/dvt_lite.cc, compiled here with g++. Then scripts/lite/check_lite.py exports the tiny T2T and DeiT
# cascades to ONNX per stage, converts every stage to .ms with Lite's converter, runs each in Lite and prints the
# max abs diff against MindSpore per stage, and runs the early-exit cascade on the Lite stages against MindSpore's
# AdaptiveCascade. WORK_DIR (default: a new folder under /tmp) keeps the exports, .ms files and Lite's logs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # $repo, and the repo's venv on PATH if it has one

usage="usage: bash scripts/check_lite.sh [WORK_DIR]"
fail() { echo "check_lite.sh: error: $*" >&2; exit 1; }
case "${1:-}" in -h|--help) echo "$usage"; exit 0 ;; -*) echo "$usage" >&2; exit 2 ;; esac
[ $# -le 1 ] || { echo "$usage" >&2; exit 2; }

version=2.0.0
wheel=mindspore_lite-$version-cp37-cp37m-manylinux1_x86_64.whl
cache=${DVT_LITE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dvt_mindspore/lite}
lite=$cache/mindspore-lite-$version/mindspore_lite
[ "$(uname -sm)" = "Linux x86_64" ] || fail "the Lite $version wheel is for Linux x86-64, this is $(uname -sm)"
command -v "${CXX:-g++}" >/dev/null || fail "${CXX:-g++} not found: a C++17 compiler builds scripts/lite/dvt_lite.cc (set CXX)"
command -v python >/dev/null || fail "python not found: activate the venv with MindSpore (pip install -r requirements.txt)"
python -c "import mindspore" 2>/dev/null || fail "this python has no MindSpore: activate its venv (pip install -r requirements.txt)"
mkdir -p "$cache" || fail "cannot create the cache folder $cache (set DVT_LITE_CACHE)"

if [ ! -f "$cache/$wheel" ]; then
  echo "downloading mindspore-lite $version (168 MB, once) into $cache"
  rm -rf "$cache/download"
  python -m pip download "mindspore-lite==$version" --no-deps --python-version 3.7 --only-binary=:all: \
      -d "$cache/download" >"$cache/download.log" 2>&1 \
    || fail "pip download of mindspore-lite $version failed (no access to the package index?): see $cache/download.log"
  [ -f "$cache/download/$wheel" ] || fail "pip downloaded no $wheel: see $cache/download.log"
  mv "$cache/download/$wheel" "$cache/$wheel"  # only a whole download lands in the cache
  rm -rf "$cache/download"
fi
if [ ! -f "$lite/lib/libmindspore_converter.so" ]; then
  echo "unpacking $wheel (483 MB) into $cache"
  rm -rf "$cache/unpack"
  python -m zipfile -e "$cache/$wheel" "$cache/unpack" || fail "cannot unpack $cache/$wheel (delete it to download again)"
  [ -f "$cache/unpack/mindspore_lite/lib/libmindspore_converter.so" ] \
    || fail "$cache/$wheel holds no mindspore_lite/lib/libmindspore_converter.so (delete it to download again)"
  rm -rf "$cache/mindspore-lite-$version"
  mkdir -p "$cache/mindspore-lite-$version"
  mv "$cache/unpack/mindspore_lite" "$lite"
  rm -rf "$cache/unpack"
fi

work=$(realpath -m "${1:-$(mktemp -d /tmp/check_lite.XXXXXX)}")
mkdir -p "$work" || fail "cannot create $work"
# Lite loads its plugins from its lib/ folder at run time: link with an rpath to it and keep the folder whole.
"${CXX:-g++}" -std=c++17 -O2 -I"$lite" "$repo/scripts/lite/dvt_lite.cc" -o "$work/dvt_lite" \
    -L"$lite/lib" -lmindspore-extendrt_python -lmindspore_converter -lmindspore_core \
    -Wl,--disable-new-dtags -Wl,-rpath,"$lite/lib" \
  || fail "compiling scripts/lite/dvt_lite.cc against $lite failed"
echo "Lite $version from $lite; work folder $work"
cd "$repo"
GLOG_v=3 python "$repo/scripts/lite/check_lite.py" --dvt_lite "$work/dvt_lite" --work "$work"
