#!/usr/bin/env bash
# Set up and run the main job on the embedded CPU default: builds (once) a tiny reasoning
# model and task, evaluates it, trains it with asynchronous RL, evaluates again, plots.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0 -e .
export DS_ACCELERATOR=cpu
async-or1 train --config configs/cpu-tiny.yaml --overwrite "$@"
