#!/usr/bin/env bash
# The one command a session lent a GPU machine runs (the device tool; ~9.5 minutes of the 15): the GPU suite with the
# CUDA tests, results and a log in $OUT (the device tool brings them back), scratch files outside it.
#
#   here, once:  the search tool's fetch of github:NVlabs/edm, then (scratch/ is ignored; never committed)
#                mkdir -p scratch/edm && git -C /work/.mirror/NVlabs+edm/repo archive HEAD | tar -x -C scratch/edm
#   device run:  GPU_SUITE_COMMIT=<git rev-parse HEAD here> bash benchmarks/gpu_session.sh
#                with carry=["scratch/edm"], timeout_s=600 (the copy there may have no .git, or an older one: the
#                suite records GPU_SUITE_COMMIT first)
#   afterwards:  copy $OUT's gpu_suite.json and gpu_suite.txt to benchmarks/results/DATE-h200/ and commit them.
#
# The whole suite fits one call (--budget-s 560 by default) but leaves the training extras out. For the training
# numbers, two calls in one lease (15 minutes, the machine's start ~30 s, given back when idle 30 s; budget_left_s
# after a 541 s call and the machine's start: 328 s; each call's extra arguments go to the suite):
#   call 1 (timeout_s=600):  ... gpu_session.sh --sections env,train --budget-s 560
#                            (H200, third lease, 541 s wall, in the order before 47ad93a: all but the compiled batch
#                            128; the plan now runs both compiled batches before our fp32 columns, so with a ~142 s
#                            compile our fp32 at 512 and the extras are what it leaves out)
#   call 2 (what is left):   ... gpu_session.sh --sections env,train --budget-s N --train-configs LIST, LIST = the
#                            NAME@BATCH that call 1's gpu_suite.txt records as "budget: ..." (add ours_bf16 at a
#                            batch for a same-process ratio: the third lease's call 2, ours_bf16@128,
#                            ours_bf16_compile@128, took 143 s wall on the H200), or the checks:
#                            --sections env,correctness,pytest_cuda,sample --budget-s N
#
# Without scratch/edm the EDM columns are skipped (the suite says so). The machine's own python3 holds PyTorch and
# every package the suite needs (click, scipy, pillow, tqdm); nothing is installed. Extra arguments go to the suite.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/$(date +%Y-%m-%d)-gpu}
mkdir -p "$out"
args=(--out "$out" --work /tmp/gpu-suite-work)
edm=${EDM_REPO:-scratch/edm}
if [ -f "$edm/training/networks.py" ]; then
  args+=(--edm-repo "$edm")
else
  echo "[gpu_session] no EDM checkout at $edm: the EDM columns are skipped"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py "${args[@]}" "$@" 2>&1 | tee "$out/gpu_session.log"
