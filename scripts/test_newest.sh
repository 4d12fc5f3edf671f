#!/usr/bin/env bash
# The second test environment CI runs after `bash scripts/test.sh`: the newest releases pip (or uv, with UV set)
# resolves today (the requirements are lower bounds), torch at setup_env.sh's default release (NEWEST_TORCH_SPEC=torch
# lets the installer pick that too), on another supported Python than the main .venv's: the newest this machine has
# of 3.13, 3.12 and 3.10.
# It lives in .venv-newest; delete that folder to resolve again. With no such Python on the machine it says so and
# exits 0. Extra arguments go to pytest; without any it runs the tests not marked slow (the distributed ones
# included: torchrun's CPU ranks on the newest Python), so that CI's two environments together stay well under 30
# minutes (18 min here in two pytest processes): the slow tests run the CLIs end to end over code paths the fast ones
# check in each library version.
set -euo pipefail
cd "$(dirname "$0")/.."

main_version=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
python=${NEWEST_PYTHON:-}
if [ -z "$python" ]; then
  for version in 3.13 3.12 3.10; do
    [ "$version" = "$main_version" ] && continue
    for candidate in "python$version" "$HOME"/.pyenv/versions/"$version".*/bin/"python$version"; do
      if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import venv' 2>/dev/null; then
        python=$(command -v "$candidate")
        break 2
      fi
    done
  done
fi
if [ -z "$python" ]; then
  echo "[newest] skipped: no Python 3.13, 3.12 or 3.10 besides the main Python $main_version on this machine"
  exit 0
fi
echo "[newest] second environment: newest packages on $("$python" --version 2>&1) ($python), in .venv-newest"
if [ $# -eq 0 ]; then
  set -- -m "not slow"
fi
PYTHON="$python" VENV="$PWD/.venv-newest" TORCH_SPEC=${NEWEST_TORCH_SPEC:-} bash scripts/test.sh "$@"
