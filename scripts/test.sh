#!/usr/bin/env bash
# The project's test command (README): set up, then run every test.
#   1. the fast suite with Numba;
#   2. the vring engine again as plain Python (NUMBA_DISABLE_JIT=1), the baseline;
#   2b. a one-minute fuzz smoke per target (scripts/fuzz.sh);
#   3. the slow tests (real Linux boots), when there are any.
# "No tests collected" (pytest exit 5) fails the fast phases.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m pytest -m "not slow" -q "$@"
NUMBA_DISABLE_JIT=1 python3 -m pytest -m "not slow" -q tests/test_vring.py tests/test_memory.py
# Fuzz smoke (issue 13): one minute of each target from the committed seed
# corpus, then its replay pure Python vs Numba; new inputs stay in a temp dir.
# A fixed seed: CI repeats the same mutations (the long campaigns explore).
FUZZ_WORK="$(mktemp -d)" bash scripts/fuzz.sh --minutes 1 --seed 1
if grep -rqs "pytest.mark.slow" tests/; then
    python3 -m pytest -m slow -q -s
fi
