#!/usr/bin/env bash
# Blockwise Flow Matching at equal training budget: every row of `python -m diffusion_accel.benchmarks.bfm`, trained
# with the same data, batch, steps and optimizer (the flow-bfm preset), then the benchmark.
# CPU (the measured recipe): two lanes of one thread each, ~45 min in all on 2 free cores.
# GPU: accelerate picks the device; raise the budget with STEPS=20000 BATCH=256 (env), same command.
# Env: RUNS (default runs/bfm), STEPS (1500), BATCH (32), SAMPLES (10000), FRN_STEPS (600).
set -eu
RUNS=${RUNS:-runs/bfm}
C="--config flow-bfm --max_train_steps ${STEPS:-1500} --train_batch_size ${BATCH:-32} --num_train_samples ${SAMPLES:-10000}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$RUNS"
(
  diffusion-accel train bfm $C --monolithic --output_dir "$RUNS/monolithic" > "$RUNS/monolithic.log" 2>&1
  diffusion-accel train bfm $C --num_segments 1 --output_dir "$RUNS/k1" > "$RUNS/k1.log" 2>&1
) &
(
  diffusion-accel train bfm $C --output_dir "$RUNS/k4" > "$RUNS/k4.log" 2>&1
  diffusion-accel train bfm_frn --config flow-bfm-frn --max_train_steps "${FRN_STEPS:-600}" \
    --train_batch_size "${BATCH:-32}" --pretrained_model "$RUNS/k4" --output_dir "$RUNS/k4-frn" > "$RUNS/k4-frn.log" 2>&1
  diffusion-accel train bfm $C --alignment_layers 0 --alignment_single_layers 0 --output_dir "$RUNS/k4-nosg" \
    > "$RUNS/k4-nosg.log" 2>&1
  diffusion-accel train bfm $C --num_segments 2 --output_dir "$RUNS/k2" > "$RUNS/k2.log" 2>&1
) &
wait
# testbed:bfm is the M = 4 model (the preset); the benchmark's stacking rows load it by that name
rm -rf assets/testbed-bfm && cp -r "$RUNS/k4" assets/testbed-bfm && rm -rf assets/testbed-bfm/checkpoint-*
python -m diffusion_accel.benchmarks.bfm --runs "$RUNS"
