#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) as one prepared command: for a session's lent GPU machine,
# or your own GPU server. `bash bench/gpu_check.sh cpu` is the dry run, on the CPU.
#
#   bash bench/gpu_check.sh [cuda|cuda:N|cpu] [60M|tiny|500M] [256k-vocab]
#
# The third argument adds the default-budget merges of that size's models (step 7 of gpu_check.py:
# 4 × 2.1 GiB generated on first use, about 3 minutes on 16 cores).
#
# Results go to $OUT (the device tool's output folder) or bench/out/gpu-check: gpu_check.json,
# the log, the CUDA tests' log and the raw nvidia-smi output. Packages the GPU machine's image
# lacks travel as wheels in .whl/ (bench/README.md says which and how).
set -uo pipefail
cd "$(dirname "$0")/.."
device=${1:-cuda}
size=${2:-60M}
out=${OUT:-bench/out/gpu-check}
mkdir -p "$out"
if ! python3 -c "import textual, tomli_w" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 bench/gpu_check.py --device "$device" --size "$size" ${3:+--budget-size "$3"} --out "$out" 2>&1 | tee "$out/gpu_check.log"
