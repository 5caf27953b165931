#!/usr/bin/env bash
# Set up (the tested versions from async_or1/constraints.txt; torch==2.13.0 is the CPU wheel)
# and run every test:
# the default suite first, then the slower end-to-end tests marked `slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -c async_or1/constraints.txt torch==2.13.0 -e '.[dev,ray]'
export DS_ACCELERATOR=cpu
# The embedded default once per machine, up front (cached after): tests that start `train` on it would
# otherwise build it inside their own time limits.
async-or1 embedded
python -m pytest -q
if [ "${ASYNC_OR1_SKIP_SLOW:-0}" != "1" ]; then
  # pytest exits 5 when it selects no test; that is not a failure of the slow stage.
  python -m pytest -q -m slow || [ $? -eq 5 ]
fi
