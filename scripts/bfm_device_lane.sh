#!/usr/bin/env bash
# The BFM lane of scripts/device_session.sh (NAMES=bfm): every row of the equal-budget table at once on one GPU,
# sized so that all end BFM_END_S seconds after SESSION_START (epoch seconds; default: now).
# Needs REPO, OUT; env BFM_BATCH (256), BFM_SAMPLES (30000), BFM_END_S (530), BFM_PROBE_STEPS (60).
set -u
end=$(( ${SESSION_START:-$(date +%s)} + ${BFM_END_S:-530} ))
start=$(date +%s)
RUNS=/tmp/bfm-probe STEPS=${BFM_PROBE_STEPS:-60} BATCH=${BFM_BATCH:-256} SAMPLES=2000 PARALLEL=1 FRN=0 BENCH=0 \
  EXTRA="--checkpointing_steps 1000000" bash "$REPO/scripts/bfm_equal_budget.sh"
mkdir -p /tmp/bfm
if ! sizing=$(python3 "$REPO/scripts/bfm_sizing.py" /tmp/bfm-probe $(( $(date +%s) - start )) $(( end - $(date +%s) )))
then  # the probe rows failed: the real ones would too; send their logs back at once
  tail -n 30 /tmp/bfm-probe/*.log
  tar -C /tmp -czf "$OUT/bfm.tgz" bfm-probe
  exit 1
fi
echo "bfm sizing: $sizing (probe ended $(( end - $(date +%s) ))s before the end)" | tee /tmp/bfm/sizing.log
read -r steps frn_steps _ <<<"$sizing"
RUNS=/tmp/bfm STEPS=$steps FRN_STEPS=$frn_steps BATCH=${BFM_BATCH:-256} SAMPLES=${BFM_SAMPLES:-30000} PARALLEL=1 \
  BENCH=0 DEADLINE=$end EXTRA="--checkpointing_steps 1000000" \
  bash "$REPO/scripts/bfm_equal_budget.sh"
echo "bfm rows ended $(( end - $(date +%s) ))s before the end" | tee -a /tmp/bfm/sizing.log
weights=transformer/diffusion_pytorch_model.safetensors
for row in monolithic k1 k2 k4-nosg k4-frn; do
  [ -f "/tmp/bfm/$row/$weights" ] && cp "/tmp/bfm/$row/$weights" "$OUT/$row.safetensors"
done
[ -f "$OUT/k4-frn.safetensors" ] || cp "/tmp/bfm/k4/$weights" "$OUT/k4.safetensors"
tar -C /tmp -czf "$OUT/bfm.tgz" --exclude='*.safetensors' --exclude='checkpoint-*' --exclude='text_encoder*' \
  --exclude='tokenizer*' --exclude=vae bfm bfm-probe
