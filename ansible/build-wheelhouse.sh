#!/bin/bash
# Build the offline wheelhouse the thox_api role installs from: the app's wheel
# (built from app/) plus every dependency, downloaded here on the controller.
# The llama-cpp-python wheel is NOT included: the role takes it separately
# (thox_api_llama_wheel), because it is built per target (CPU / GGML_CUDA=on).
#
# usage: build-wheelhouse.sh OUTDIR [extra pip download args, e.g. for Jetson:
#          --platform manylinux2014_aarch64 --python-version 3.10 --implementation cp]
# env:   PYTHON (default python3), THOX_LLAMA_WHEELS (a --find-links folder that
#        holds a llama-cpp-python wheel for the target, used only to resolve it)
# Writes OUTDIR/wheels/*.whl and OUTDIR/thox-wheelhouse.tar (reproducible:
# sorted names, fixed mtimes), and skips all work when app/ has not changed.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:?usage: build-wheelhouse.sh OUTDIR [pip download args]}"; shift
py="${PYTHON:-python3}"
llama_dir="${THOX_LLAMA_WHEELS:-/var/cache/thox-build/wheels/host}"
export SOURCE_DATE_EPOCH=315532800   # reproducible wheel and tar timestamps

key="$( { cat "$0"; echo "$*"; cd "$repo/app" && find . -path ./build -prune -o -name '*.egg-info' -prune -o -name __pycache__ -prune -o -type f -print0 | sort -z | xargs -0 sha256sum; } | sha256sum | cut -c1-16)"
if [ -s "$out/thox-wheelhouse.tar" ] && [ "$(cat "$out/.key" 2>/dev/null)" = "$key" ]; then
  echo "$out/thox-wheelhouse.tar"; exit 0
fi

mkdir -p "$out/wheels"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
# build from a copy so nothing (build/, *.egg-info) lands in the work tree
cp -a "$repo/app" "$tmp/app"; rm -rf "$tmp/app/build" "$tmp"/app/*.egg-info
"$py" -m pip wheel -q --no-deps "$tmp/app" -w "$tmp/dist" >&2
appwheel="$(ls "$tmp"/dist/thox-*.whl)"
rm -f "$out"/wheels/thox-*.whl
"$py" -m pip download -q --only-binary=:all: --find-links "$llama_dir" -d "$out/wheels" "$@" "$appwheel" >&2
rm -f "$out"/wheels/llama_cpp_python-*.whl
tar --sort=name --mtime=@"$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
    -C "$out/wheels" -cf "$out/thox-wheelhouse.tar.tmp" .
mv "$out/thox-wheelhouse.tar.tmp" "$out/thox-wheelhouse.tar"
echo "$key" > "$out/.key"
echo "$out/thox-wheelhouse.tar"
