#!/usr/bin/env bash
# One piece of a long run on a lent GPU whose calls last minutes (the device tool: 10 minutes a
# call). Starts PRESET in RUN (or resumes it when RUN already holds a checkpoint: one brought back
# by an earlier piece and carried in), trains until --time-limit would be passed, then copies what
# the next piece and the reproduction record need under $OUT: checkpoint.pt, best.pt,
# metrics.jsonl, config.yaml, run.json and the log. Exit status 0 when the piece ran (a run stopped
# at its time limit included).
#
#   bash benchmarks/gpu_piece.sh PRESET RUN DATA_ROOT [TIME_LIMIT [extra eqprop train arguments]]
#
# e.g. bash benchmarks/gpu_piece.sh cifar10-ce-symmetric devdata/ce devdata 8m
# On this machine afterwards: copy the files back into benchmarks/reproduction/PRESET/ and run
#   python benchmarks/reproduction.py record benchmarks/reproduction/PRESET --machine "GPU" --commit SHA ...
set -uo pipefail
PRESET=${1:?preset}
RUN=${2:?run folder}
DATA=${3:?data root}
LIMIT=${4:-8m}
shift $(( $# < 4 ? $# : 4 ))
OUT=${OUT:-/tmp/eqprop-piece}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -f "$RUN/checkpoint.pt" ]; then
    command=(python3 -m eqprop train --resume "$RUN" --data-dir "$DATA" --time-limit "$LIMIT" --no-progress "$@")
else
    command=(python3 -m eqprop train --preset "$PRESET" --out "$RUN" --data-dir "$DATA" --time-limit "$LIMIT"
             --no-progress "$@")
fi
echo "${command[*]}" | tee -a "$OUT/commands.txt"
"${command[@]}" 2>&1 | tee "$OUT/train.log"
status=${PIPESTATUS[0]}
for name in checkpoint.pt best.pt metrics.jsonl config.yaml run.json rolled_back.jsonl; do
    if [ -f "$RUN/$name" ]; then cp "$RUN/$name" "$OUT/"; fi
done
if [ "$status" -eq 0 ] || [ "$status" -eq 75 ]; then exit 0; fi
exit "$status"
