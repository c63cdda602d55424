#!/usr/bin/env bash
# Issue 20's two GPU figures in one device call: bench/gpu_check.py (its docstring says what runs and how long).
#   here, once, before the call:  bench/gpu_check.sh wheels   the repo's Python deps that the GPU image lacks, at the
#                                                            versions of .venv, as wheels in .whl/ (carry it)
#   on the GPU machine:           bench/gpu_check.sh          installs .whl/ into /tmp/site if needed, runs, and
#                                                            writes gpu_latency.json, mfu.json, the profile and the
#                                                            log to $OUT (else bench/results); killed at 480 s
#   rehearsal here:               bench/gpu_check.sh --dry-run [--out-dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
# deepspeed and pydantic-settings (pipelines/train) with their own needs; torch, numpy, ninja... are on the image
WHEELS=(deepspeed hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions pydantic-settings
        python-dotenv)

if [[ ${1:-} == wheels ]]; then
  py=${PYTHON:-.venv/bin/python}
  mkdir -p .whl
  for name in "${WHEELS[@]}"; do
    version=$("$py" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")
    if [[ $name == deepspeed ]]; then  # PyPI has only its sdist: build the pure-Python wheel here (no ops prebuilt)
      DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$version"
    else
      "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$name==$version"
    fi
  done
  ls -l .whl
  exit 0
fi

py=${PYTHON:-python3}
if [[ ${1:-} == --dry-run ]]; then
  out=$(mktemp -d -t gpu_check_dry_XXXX)
else
  out=${OUT:-bench/results}
  if ! "$py" -c 'import deepspeed, pydantic_settings' 2>/dev/null; then
    if ! compgen -G '.whl/*.whl' >/dev/null; then
      echo "gpu_check: deepspeed / pydantic-settings are missing and .whl/ is empty: run 'bench/gpu_check.sh wheels'" \
           "where the repo's .venv is, and carry .whl" >&2
      exit 2
    fi
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  # expandable segments: no fragmentation-driven cache flushes near full memory (recorded as alloc_conf)
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True} DS_ACCELERATOR=cuda
fi
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
mkdir -p "$out"
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name())'
timeout -k 10 "${GPU_CHECK_TIMEOUT_S:-480}" "$py" bench/gpu_check.py --out-dir "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
