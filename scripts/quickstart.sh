#!/usr/bin/env bash
# The main job, from a fresh clone: set up the environment (first run only), then build the `digits` dataset,
# train a small DDPM++ with the EDM loss, sample a grid, and evaluate; everything lands in quickstart-out/.
# Idempotent: running it again skips finished steps and resumes an interrupted training run (one with other
# training settings is refused: see quickstart.py).
# Extra arguments go to quickstart.py (see `python quickstart.py --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
python quickstart.py "$@"
