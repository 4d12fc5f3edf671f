#!/usr/bin/env bash
# Set up the environment if needed and run the test suite (the README's test command): ruff, then pytest in
# TEST_WORKERS processes (pytest-xdist; default 2, 0 for one process). The tests keep one intra-op thread each
# (tests/conftest.py), so two processes use two cores: the suite takes ~12.5 min instead of ~18 on 2 cores.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
ruff check .
python -m pytest -q -n "${TEST_WORKERS:-2}" "$@"
