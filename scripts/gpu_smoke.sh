#!/usr/bin/env bash
# GPU smoke check, at most 8 minutes on a machine with one GPU: the embedded config (torch engine
# generator + DeepSpeed learner) on CUDA in bf16, sharing GPU 0; the weight group over gloo (NCCL
# refuses two ranks on one GPU), the learner's and the generator's weight fingerprints compared after
# every broadcast, trained tokens/s printed. The Python entry is scripts/gpu_smoke.py.
#
#   bash scripts/gpu_smoke.sh --prepare   # here (package registry reachable): wheels of what the GPU
#                                         # machine lacks -> .whl/, the embedded model cache -> .smoke-cache/
#   bash scripts/gpu_smoke.sh             # on the GPU machine (carry .whl and .smoke-cache)
#   bash scripts/gpu_smoke.sh --cpu       # the same check on CPU (tests/test_gpu_smoke.py runs it)
set -euo pipefail
cd "$(dirname "$0")/.."

# What the GPU image (Python 3.12, torch 2.11 + CUDA) lacks of our dependencies, at the versions we test.
WHEELS="deepspeed==0.19.8 pyzmq==27.3.0 math-verify==0.9.0 latex2sympy2_extended==1.11.0
antlr4-python3-runtime==4.13.2 hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0
typing-inspection==0.4.2"

case "${1:-}" in
  --prepare)
    mkdir -p .whl  # .whl/ and .smoke-cache/ are in .gitignore
    for w in $WHEELS; do
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$w" 2>/dev/null || python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl "$w"
    done
    cache="${ASYNC_OR1_CACHE:-$HOME/.cache/async-or1}"
    python3 -m async_or1.cli embedded >/dev/null  # built once under a lock, if not yet
    rm -rf .smoke-cache && mkdir -p .smoke-cache && cp -r "$cache"/embedded-v1 .smoke-cache/
    du -sh .whl .smoke-cache
    ;;
  --cpu)
    exec python3 scripts/gpu_smoke.py --device cpu "${@:2}"
    ;;
  *)
    if [ -d .whl ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    if [ -d .smoke-cache ]; then export ASYNC_OR1_CACHE="$PWD/.smoke-cache"; fi
    exec timeout 470 python3 scripts/gpu_smoke.py --device cuda "$@"
    ;;
esac
