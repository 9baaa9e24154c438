#!/usr/bin/env bash
# The CUDA smoke check, for a GPU machine with python3 and torch (CI has no GPU): the CUDA tests, the
# quick demo on --device cuda (timed, with the CPU-only figures of benchmarks/bench_demo.py beside it
# in the closing notes), then the whole suite with CUDA visible (every "auto" audit then runs there).
# Packages the machine lacks can be given as wheels in .whl/ (opacus, mlxtend). Writes logs to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/splitaudit-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD:${PYTHONPATH:-}
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/env.log"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | tail -25
( time python3 -m splitaudit.cli demo --profile quick --device cuda --out /tmp/splitaudit-cuda-demo --cache-dir /tmp/splitaudit-cuda-cache ) > "$OUT/demo.log" 2>&1
cp /tmp/splitaudit-cuda-demo/results.json "$OUT/demo_results.json" 2>/dev/null
tail -30 "$OUT/demo.log"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests --deselect tests/test_cuda.py 2>&1 | tee "$OUT/tests_all.log" | tail -25
