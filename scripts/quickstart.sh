#!/usr/bin/env bash
# Set up and run the main job on the embedded CPU default: builds (once) a tiny reasoning
# model and task, evaluates it, trains it with asynchronous RL, evaluates again, plots.
# Extra arguments go to `async-or1 train` (dotted overrides, e.g. schedule.0.steps=20).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "quickstart: pip install (the tested versions, async_or1/constraints.txt; torch==2.13.0 is the CPU wheel)"
python -m pip install -q -c async_or1/constraints.txt torch==2.13.0 -e .
export DS_ACCELERATOR=cpu
async-or1 doctor
async-or1 train --config configs/cpu-tiny.yaml --overwrite "$@"
