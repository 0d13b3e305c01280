#!/usr/bin/env bash
# The end-to-end recipe on the built-in captioned_shapes data set, sized for a 2-core CPU (about 1 hour 20 min alone on one):
# tiny CLIP -> embeddings -> tiny prior -> the `shapes` decoder -> tiny 64->256 upsampler -> bundle ->
# quality report (OUTDIR/report.json, OUTDIR/report.md) and a grid of 8 test captions (OUTDIR/grid.png).
#
#   launch/shapes_recipe.sh OUTDIR
#
# Every step resumes: rerunning the command after an interruption continues where it stopped (finished
# stages return at once). Step counts can be changed through the environment, e.g. a smoke run:
#   CLIP_STEPS=20 PRIOR_STEPS=20 DECODER_STEPS=10 UPSAMPLER_STEPS=10 REPORT_NUM=16 \
#     launch/shapes_recipe.sh /tmp/smoke   # warm-ups and intervals longer than a run are clamped
# EXTRA_FLAGS is appended to every train command (e.g. EXTRA_FLAGS="--config.data.data_dir=DATA"), EMBED_FLAGS
# to the embed command; SKIP_REPORT=1 stops after the export (the report needs captioned_shapes' scenes).
# CLIP_WORKDIR reuses a CLIP trained elsewhere (the Quick start's runs/clip_tiny: 2500 steps, so it returns
# at once); by default the CLIP is trained in OUTDIR/clip.
# OUTDIR/timings.tsv records the wall time of each step.
set -euo pipefail
OUT=${1:?usage: launch/shapes_recipe.sh OUTDIR}
CLIP_STEPS=${CLIP_STEPS:-2500}
CLIP_WORKDIR=${CLIP_WORKDIR:-$OUT/clip}
PRIOR_STEPS=${PRIOR_STEPS:-1000}
DECODER_STEPS=${DECODER_STEPS:-1000}
UPSAMPLER_STEPS=${UPSAMPLER_STEPS:-400}
REPORT_NUM=${REPORT_NUM:-256}
DECODER_CONFIG=${DECODER_CONFIG:-configs/decoder.py:shapes}
EXTRA_FLAGS=${EXTRA_FLAGS:-}
EMBED_FLAGS=${EMBED_FLAGS:-}
SKIP_REPORT=${SKIP_REPORT:-0}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
TIMINGS="$OUT/timings.tsv"

step() {  # step NAME COMMAND...: runs the command, appends "NAME<TAB>seconds" to timings.tsv
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name: $*"
  "$@"
  printf '%s\t%s\n' "$name" "$((SECONDS - t0))" >> "$TIMINGS"
}

# shellcheck disable=SC2086
step clip dalle2-jax train --config configs/clip.py:tiny --workdir "$CLIP_WORKDIR" \
  --config.total_steps="$CLIP_STEPS" --config.eval_every=0 --config.checkpoint_every=500 $EXTRA_FLAGS
if [ ! -f "$OUT/emb/.done" ]; then
  # shellcheck disable=SC2086
  step embed dalle2-jax embed --clip_workdir "$CLIP_WORKDIR" --out "$OUT/emb" $EMBED_FLAGS
  touch "$OUT/emb/.done"
fi
# shellcheck disable=SC2086
step prior dalle2-jax train --config configs/prior.py:tiny --workdir "$OUT/prior" \
  --config.clip_workdir="$CLIP_WORKDIR" --config.data.embeddings_dir="$OUT/emb" \
  --config.total_steps="$PRIOR_STEPS" --config.eval_every=0 --config.checkpoint_every=500 $EXTRA_FLAGS
# shellcheck disable=SC2086
step decoder dalle2-jax train --config "$DECODER_CONFIG" --workdir "$OUT/decoder" \
  --config.clip_workdir="$CLIP_WORKDIR" --config.data.embeddings_dir="$OUT/emb" \
  --config.total_steps="$DECODER_STEPS" $EXTRA_FLAGS
# shellcheck disable=SC2086
step upsampler dalle2-jax train --config configs/upsampler.py:tiny_64to256 --workdir "$OUT/upsampler" \
  --config.total_steps="$UPSAMPLER_STEPS" --config.checkpoint_every=200 $EXTRA_FLAGS
if [ ! -f "$OUT/bundle/manifest.json" ]; then
  step export dalle2-jax export --clip "$CLIP_WORKDIR" --prior "$OUT/prior" --decoder "$OUT/decoder" \
    --upsampler "$OUT/upsampler" --out "$OUT/bundle"
fi
if [ "$SKIP_REPORT" = 1 ]; then
  echo "bundle: $OUT/bundle, timings: $TIMINGS"
  exit 0
fi
step report dalle2-jax shapes-report --bundle "$OUT/bundle" --clip_workdir "$CLIP_WORKDIR" \
  --prior_workdir "$OUT/prior" --decoder_workdir "$OUT/decoder" --upsampler_workdir "$OUT/upsampler" \
  --out "$OUT" --num "$REPORT_NUM" --note "launch/shapes_recipe.sh; steps: clip $CLIP_STEPS, prior $PRIOR_STEPS, decoder $DECODER_STEPS ($DECODER_CONFIG), upsampler $UPSAMPLER_STEPS"
echo "report: $OUT/report.md, grid: $OUT/grid.png, timings: $TIMINGS"
