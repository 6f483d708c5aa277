#!/bin/sh
# Build llama.cpp's C++ llama-server from the llama.cpp source vendored in the
# llama-cpp-python sdist (so it is the very same llama.cpp version as our
# engine), once, cached under $CACHE/llama-server-$VERSION/.
#
#   tests/bench/build_llama_server.sh            # build if not cached
#   FORCE=1 tests/bench/build_llama_server.sh    # rebuild
#   KEEP_BUILD=1 ...                             # keep the source and build tree
#
# Output: $CACHE/llama-server-$VERSION/bin/llama-server (static, no curl, no
# OpenSSL, no web UI) and the stamp file .../stamp. Log: $CACHE/logs/llama-server-build.log
set -eu

# llama-cpp-python's version: LLAMA_CPP_PYTHON_VERSION of versions.env unless given
VERSION=${LLAMA_VERSION:-$(python3 "$(dirname "$0")/../../app/thox/pins.py" get LLAMA_CPP_PYTHON_VERSION)}
CACHE=${CACHE:-/var/cache/thox-build}
JOBS=${JOBS:-2}
PIP=${PIP:-pip}
SDIST_DIR=$CACHE/sdist
SDIST=$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz
OUT=$CACHE/llama-server-$VERSION
SRC=$OUT/src
BUILD=$OUT/build
LOG=$CACHE/logs/llama-server-build.log
STAMP=$OUT/stamp

# Same flags as llama-cpp-python's host wheel where it matters: Release,
# GGML_NATIVE=ON (the wheel's default), OpenMP on (ggml's default). Static so
# the cached binary runs on its own. No curl/OpenSSL (no model downloads), no
# web UI (no npm, no Hugging Face bucket download).
CMAKE_FLAGS="-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_OPENMP=ON \
 -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
 -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
 -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_LLGUIDANCE=OFF"
WANT="llama-cpp-python $VERSION sdist vendor/llama.cpp; $CMAKE_FLAGS"

if [ -z "${FORCE:-}" ] && [ -x "$OUT/bin/llama-server" ] && [ -f "$STAMP" ] \
   && [ "$(cat "$STAMP")" = "$WANT" ]; then
    echo "llama-server: cached at $OUT/bin/llama-server"
    exit 0
fi

mkdir -p "$SDIST_DIR" "$OUT" "$CACHE/logs"
for tool in cmake g++ make; do
    command -v $tool >/dev/null || { echo "llama-server: '$tool' missing (apt-get install cmake build-essential)"; exit 1; }
done
if [ ! -s "$SDIST" ]; then
    echo "llama-server: downloading the llama-cpp-python $VERSION sdist (76 MB) to $SDIST_DIR"
    $PIP download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SDIST_DIR" >"$LOG" 2>&1 \
        || { tail -20 "$LOG"; exit 1; }
fi
rm -rf "$SRC" "$BUILD" "$STAMP"
mkdir -p "$SRC"
tar -xzf "$SDIST" -C "$SRC" --strip-components=3 "llama_cpp_python-$VERSION/vendor/llama.cpp"
echo "llama-server: building from $SRC (a few minutes on 2 cores; log $LOG)"
start=$(date +%s)
{
    # shellcheck disable=SC2086
    cmake -S "$SRC" -B "$BUILD" $CMAKE_FLAGS && \
    nice -n 5 cmake --build "$BUILD" --target llama-server -j "$JOBS"
} >"$LOG" 2>&1 || { tail -30 "$LOG"; echo "llama-server: build failed, see $LOG"; exit 1; }
mkdir -p "$OUT/bin"
cp "$BUILD/bin/llama-server" "$OUT/bin/llama-server.tmp"
mv "$OUT/bin/llama-server.tmp" "$OUT/bin/llama-server"
"$OUT/bin/llama-server" --version >>"$LOG" 2>&1 || true
printf '%s\n' "$WANT" >"$STAMP"
# the binary is all the bench needs: drop the 270 MB of source and objects
[ -n "${KEEP_BUILD:-}" ] || rm -rf "$SRC" "$BUILD"
echo "llama-server: built in $(( $(date +%s) - start ))s -> $OUT/bin/llama-server"
