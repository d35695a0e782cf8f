#!/usr/bin/env bash
# Creates .venv and installs edgelm with everything the README's commands need.
# Idempotent and quick on a second run: the venv is reused, pip is skipped entirely while
# pyproject.toml is unchanged, and llama.cpp (a ~5 minute compile) is built once per CPU into
# a wheel cache of our own.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LLAMA_CPP_VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
# llama.cpp is compiled for this CPU (-march=native) but without its AMX kernels: on CPUs with
# AMX (Sapphire Rapids and later) they crash in ggml_backend_amx_mul_mat on the Q4 models we ship.
# GCC lets explicit -mno-* flags win over -march=native whatever their order.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
export CFLAGS="${CFLAGS:-} $NO_AMX" CXXFLAGS="${CXXFLAGS:-} $NO_AMX"
export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=ON"}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi

# pip's own wheel cache keys a built wheel on the source archive alone, so a wheel compiled on
# another CPU or with other flags would be reused (and could crash). Ours is keyed on all three.
cpu_key=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m)
key=$(printf '%s|%s|%s|%s' "$LLAMA_CPP_VERSION" "$CMAKE_ARGS" "$CFLAGS" "$cpu_key" | sha256sum | cut -c1-16)
wheels="${XDG_CACHE_HOME:-$HOME/.cache}/edgelm/wheels/llama-cpp-python-$key"

stamp=.venv/.edgelm-installed
want=$(cat pyproject.toml "$0" | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! .venv/bin/python -c "import edgelm, llama_cpp" 2>/dev/null; then
  .venv/bin/python -m pip install --disable-pip-version-check -q --upgrade pip
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "[setup] compiling llama.cpp for this CPU (about 5 minutes on 2 cores, once)"
    mkdir -p "$wheels.tmp"
    .venv/bin/python -m pip wheel --disable-pip-version-check -q --no-deps --no-cache-dir \
      -w "$wheels.tmp" "llama-cpp-python==$LLAMA_CPP_VERSION"
    rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
  fi
  echo "[setup] installing edgelm[all]"
  .venv/bin/python -m pip install --disable-pip-version-check -q --force-reinstall --no-deps \
    "$wheels"/llama_cpp_python-*.whl
  .venv/bin/python -m pip install --disable-pip-version-check -q -e '.[all]'
  echo "$want" > "$stamp"
fi
