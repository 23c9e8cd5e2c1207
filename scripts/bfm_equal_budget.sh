#!/usr/bin/env bash
# Blockwise Flow Matching at equal training budget: every row of `python -m diffusion_accel.benchmarks.bfm`, trained
# with the same data, batch, steps and optimizer (the flow-bfm preset), then the benchmark.
# CPU (the measured recipe): two lanes of one thread each, ~45 min in all on 2 free cores.
# GPU: accelerate picks the device; PARALLEL=1 runs every stage-1 row at once (tiny models leave a GPU mostly idle),
# with the budget raised, e.g. STEPS=3000 BATCH=256 SAMPLES=30000 (scripts/device_session.sh, NAMES=bfm, sizes it).
# Env: RUNS (default runs/bfm), STEPS (1500), BATCH (32), SAMPLES (10000), FRN_STEPS (600), PARALLEL (0),
# FRN (1: also train the FRN stage), BENCH (1: copy k4 to assets/testbed-bfm and run the benchmark),
# DEADLINE (epoch seconds: every training is stopped then), EXTRA (flags added to every training), PYTHON (python3).
set -eu
RUNS=${RUNS:-runs/bfm}
PY=${PYTHON:-python3}
C="--config flow-bfm --max_train_steps ${STEPS:-1500} --train_batch_size ${BATCH:-32} --num_train_samples ${SAMPLES:-10000}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$RUNS"

until_deadline() {  # the command, under `timeout` when DEADLINE is set
  if [ -n "${DEADLINE:-}" ]; then timeout $(( DEADLINE - $(date +%s) > 1 ? DEADLINE - $(date +%s) : 1 )) "$@"; else "$@"; fi
}
stage1() {  # stage1 <row folder> <flags that differ from the preset>
  local row=$1; shift
  until_deadline $PY -m diffusion_accel.train bfm $C ${EXTRA:-} "$@" --output_dir "$RUNS/$row" > "$RUNS/$row.log" 2>&1
}
frn() {
  [ "${FRN:-1}" = 1 ] || return 0
  until_deadline $PY -m diffusion_accel.train bfm_frn --config flow-bfm-frn --max_train_steps "${FRN_STEPS:-600}" \
    --train_batch_size "${BATCH:-32}" --pretrained_model "$RUNS/k4" --output_dir "$RUNS/k4-frn" ${EXTRA:-} \
    > "$RUNS/k4-frn.log" 2>&1
}

if [ "${PARALLEL:-0}" = 1 ]; then
  set +e  # lanes are independent: one failing leaves the others running
  stage1 monolithic --monolithic &
  stage1 k1 --num_segments 1 &
  stage1 k2 --num_segments 2 &
  stage1 k4-nosg --alignment_layers 0 --alignment_single_layers 0 &
  ( stage1 k4 && frn ) &
  wait
  set -e
else
  (
    stage1 monolithic --monolithic
    stage1 k1 --num_segments 1
  ) &
  (
    stage1 k4
    frn
    stage1 k4-nosg --alignment_layers 0 --alignment_single_layers 0
    stage1 k2 --num_segments 2
  ) &
  wait
fi
[ "${BENCH:-1}" = 1 ] || exit 0
# testbed:bfm is the M = 4 model (the preset); the benchmark's stacking rows load it by that name
rm -rf assets/testbed-bfm && cp -r "$RUNS/k4" assets/testbed-bfm && rm -rf assets/testbed-bfm/checkpoint-*
$PY -m diffusion_accel.benchmarks.bfm --runs "$RUNS"
