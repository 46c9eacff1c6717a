#!/bin/bash
# The GPU checks of issue 19, as one short prepared script for a lent CUDA machine (the `device`
# tool's `run`, from the repository root, with `carry: [".whl"]`). `.whl/` holds the wheels that
# machine lacks (expecttest, importlib_metadata, zipp: `pip download` them here; .git/info/exclude
# ignores the folder). Results under $OUT (or ./gpu_out when run by hand). About 5-7 minutes:
#   1. the CUDA tests (tests/reliability/test_cuda.py, test_devices.py);
#   2. storch.compile's replay tests on that machine's torch;
#   3. storch-compare ops --device cuda (per call on plate tensors vs raw);
#   4. storch-compare overhead --device cuda --replay, VAE rows (loo, unordered_set, gumbel_softmax).
set -o pipefail
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MPLBACKEND=Agg
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --find-links .whl --no-deps expecttest importlib_metadata zipp >/dev/null 2>&1
python3 -m pip install -q --no-deps --no-build-isolation -e packages/storch-core -e packages/storch-estimators-score \
    -e packages/storch-estimators-relaxed -e packages/storch-estimators-mvd -e benchmarks 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
echo "== CUDA tests"
timeout 220 python3 -m pytest -q tests/reliability/test_cuda.py tests/reliability/test_devices.py -p no:cacheprovider \
    2>&1 | tee "$OUT/cuda_tests.log" | tail -6
echo "== replay tests"
timeout 120 python3 -m pytest -q tests/models/test_compile.py -k "unordered_set or replay or gumbel" -p no:cacheprovider 2>&1 | tail -3
echo "== ops, cuda"
timeout 80 storch-compare ops --device cuda --min-time 0.05 --out "$OUT" 2>&1 | tail -50
echo "== overhead, cuda"
timeout 150 storch-compare overhead --device cuda --problems vae --configs loo,unordered_set,gumbel_softmax --batch-sizes 1,100 \
    --n-samples 8 --min-time 0.1 --replay --no-progress --out "$OUT/overhead" 2>&1 | head -10
