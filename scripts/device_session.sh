#!/usr/bin/env bash
# One prepared GPU session (run through the workplace's `device` tool, never by CI):
#   1. the Triton block-sparse kernel compiled for real: correctness vs the fp32 reference, then timings against
#      dense SDPA (FlashAttention / cuDNN / efficient) at Wan's video token counts (diffusion_accel.kernels.bench_cuda);
#   2. the two testbed pipelines trained on the GPU with the same command as on CPU (accelerate picks the device),
#      both at once (tiny models leave the GPU mostly idle); NAMES="wan" (or "pixart flow wan") trains the video
#      testbed with its GPU recipe instead (train_wan.WAN_RECIPES[$WAN_RECIPE], default "shipped"; "shipped-4x" is
#      the 4x-VAE chain; comes back as wan.tgz).
#   3. NAMES="bfm": every row of the Blockwise Flow Matching equal-budget table at once, sized to end BFM_END_S
#      seconds after this script started (scripts/bfm_device_lane.sh); comes back as <row>.safetensors and bfm.tgz,
#      which `python scripts/bfm_unpack.py` turns back into run folders for the benchmark;
#   4. NAMES="resume": the trainer stack's kill-and-resume test on CUDA in fp16 (grad scaler, CUDA generators).
# Env: TRAIN_MIN, LR, BATCH, NUM_TRAIN, KERNEL_S (0 skips the kernels), INIT_PREFIX (continue from <INIT_PREFIX><name>,
# e.g. assets/testbed-), FLOW_LOW_RES (flow: share of steps at half resolution), NAMES (default "pixart flow"),
# WAN_MIN (wan: minutes for the whole command, split as the recipe's budgets; default the recipe's), WAN_TIMEOUT (1200 s),
# WAN_RECIPE (shipped),
# BFM_* (see the lane).
# Results land flat in $OUT (at most 8 files come back). Needs .whl/ with diffusers and importlib_metadata wheels.
set -u
SESSION_START=$(date +%s)
OUT=${OUT:-/tmp/device_out}
TRAIN_MIN=${TRAIN_MIN:-4}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# The package as setuptools installs it (pipelines/, kernels/, eval/ inside diffusion_accel), without a build step.
mkdir -p /tmp/pkg && cp -r diffusion_accel /tmp/pkg/ && cp -r pipelines kernels eval /tmp/pkg/diffusion_accel/ \
  && ln -sfn "$PWD/assets" /tmp/pkg/diffusion_accel/assets
REPO=$PWD
cd /tmp  # the checkout's own diffusion_accel/ (without pipelines/ inside) must not shadow /tmp/pkg
export PYTHONPATH=/tmp/pkg:/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 DA_THREADS=6 TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/kernels.log"
if [ "${KERNEL_S:-150}" != 0 ]; then
  timeout "${KERNEL_S:-150}" python3 -m diffusion_accel.kernels.bench_cuda --json "$OUT/kernels.json" >>"$OUT/kernels.log" 2>&1
  echo "kernel bench exit $?" | tee -a "$OUT/kernels.log"
fi
for name in ${NAMES:-pixart flow}; do
  if [ "$name" = resume ]; then
    timeout 240 python3 -m pytest -q -p no:cacheprovider "$REPO/tests/train/test_trainer_stack.py" -k killed_and_resumed \
      >"$OUT/resume_check.log" 2>&1 &
    continue
  fi
  if [ "$name" = bfm ]; then
    REPO=$REPO OUT=$OUT SESSION_START=$SESSION_START bash "$REPO/scripts/bfm_device_lane.sh" >"$OUT/bfm_lane.log" 2>&1 &
    continue
  fi
  if [ "$name" = wan ]; then  # the video testbed: its own VAE, then the pipeline (recipe "shipped", ~10 min)
    (
      timeout "${WAN_TIMEOUT:-1200}" python3 -m diffusion_accel.pipelines.testbed.train wan /tmp/tb-wan \
        --recipe "${WAN_RECIPE:-shipped}" \
        ${WAN_MIN:+--minutes "$WAN_MIN"} >"$OUT/train_wan.log" 2>&1
      echo "train exit $?" >>"$OUT/train_wan.log"
      # one file back: the whole pipeline folder and the VAE's run folder (replace assets/testbed-wan with tb-wan)
      tar -C /tmp -czf "$OUT/wan.tgz" tb-wan tb-wan-vae $( [ -d /tmp/tb-wan-decoder ] && echo tb-wan-decoder )
    ) &
    continue
  fi
  (
    timeout $(( ${TRAIN_MIN%.*} * 60 + 200 )) python3 -m diffusion_accel.pipelines.testbed.train "$name" "/tmp/tb-$name" \
      --vae-path "$REPO/assets/testbed-pixart/vae" --minutes "$TRAIN_MIN" --steps 1000000 --batch-size "${BATCH:-512}" \
      --lr "${LR:-8e-4}" --num-train "${NUM_TRAIN:-60000}" --eval-prompts 0 \
      ${INIT_PREFIX:+--init-from "$REPO/$INIT_PREFIX$name"} \
      $( [ "$name" = flow ] && [ -n "${FLOW_LOW_RES:-}" ] && echo --low-res-share "$FLOW_LOW_RES" ) \
      >"$OUT/train_$name.log" 2>&1
    echo "train exit $?" >>"$OUT/train_$name.log"
    cp "/tmp/tb-$name/transformer/diffusion_pytorch_model.safetensors" "$OUT/$name.safetensors"
    cp "/tmp/tb-$name/transformer/config.json" "$OUT/$name.config.json"
  ) &
done
wait
tail -n 3 "$OUT"/*.log
# the logs travel as one file (at most 8 come back)
(cd "$OUT" && tar -czf logs.tgz ./*.log && rm -f ./*.log)
ls -la "$OUT"
