#!/usr/bin/env bash
# The solvers' GPU checks, in one call of a lent GPU machine (repository root, PyTorch already
# there): the CUDA and solver tests, then one epoch of the CIFAR-10 CE-symmetric preset with the
# papers' fixed steps and with `tolerance`, side by side on the same card. The CIFAR-10 files must
# be under $DATA/cifar10 (a call carries at most two ~27 MiB batch files: bring the others in
# earlier calls while the machine is warm, into a git-ignored folder). Writes under $OUT:
# tests.log, and the two runs' metrics.jsonl as fixed.jsonl and tolerance.jsonl.
#
#   bash benchmarks/gpu_solvers.sh DATA_ROOT [EPOCHS]
set -euo pipefail
DATA=${1:?data root holding cifar10/}
EPOCHS=${2:-1}
OUT=${OUT:-/tmp/eqprop-gpu}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
python3 -m pytest -q tests/test_cuda.py tests/test_solvers.py 2>&1 | tee "$OUT/tests.log" | tail -3
for solver in fixed tolerance; do
    rm -rf "/tmp/ce-$solver"
    python3 -m eqprop train --preset cifar10-ce-symmetric --data-dir "$DATA" --device cuda --epochs "$EPOCHS" \
        --out "/tmp/ce-$solver" --no-progress --set solver.name=$solver --set solver.tol=1e-4
    cp "/tmp/ce-$solver/metrics.jsonl" "$OUT/$solver.jsonl"
done
