#!/usr/bin/env bash
# The demo pipeline that `make demo` runs (and tests/test_demo.py runs on a smaller corpus):
# corpus → tiny models → curation → captioning → selection → training shards → training → summary.
# Environment: DEMO_OUT, DEMO_N, DEMO_SEED, DEMO_CONFIG, NPROC (defaults below). Ray starts in-process
# in each step unless RAY_ADDRESS names a cluster.
set -euo pipefail
OUT=${DEMO_OUT:-demo_out}
N=${DEMO_N:-24}
SEED=${DEMO_SEED:-0}
CONFIG=${DEMO_CONFIG:-configs/debug.toml}
NPROC=${NPROC:-2}
RUN=$OUT/run
MODELS=$OUT/models
step() { printf '\n== %s\n' "$*"; }

step "1/8 demo corpus ($N good images + one of each bad kind) → $OUT/corpus"
python -m curation.demo_corpus --out "$OUT/corpus" --n "$N" --seed "$SEED"

step "2/8 tiny models built offline → $MODELS"
[ -f "$MODELS/t5/config.json" ] || python -m training.tiny --out "$MODELS"
[ -f "$MODELS/llava/config.json" ] || python -m captioning.tiny --out "$MODELS"

step "3/8 curation → $RUN"
python curation/run.py --input "$OUT/corpus" --output "$RUN" --samples-per-shard 8

step "4/8 captioning (tiny LLaVA) → $RUN/manifests/captions"
python captioning/run.py --input "$RUN" --model "$MODELS/llava" --tokenizer "$MODELS/t5" --preset debug

step "5/8 selection: kept rows with a caption"
python -m manifests.selection --root "$RUN" --name demo --where "caption_orig IS NOT NULL OR caption_vlm IS NOT NULL"

step "6/8 training shards with cached T5 and VAE features"
python -m manifests.materialize --root "$RUN" --selection demo --samples-per-shard 4 \
    --t5 "$MODELS/t5" --vae "$MODELS/vae" --vae-resolution 64

step "7/8 training: torchrun --nproc_per_node=$NPROC training/main.py --config $CONFIG"
torchrun --nproc_per_node="$NPROC" training/main.py --config "$CONFIG" --output "$OUT/train" \
    --set data.shards="$RUN/train_shards/demo" --set text.t5="$MODELS/t5" \
    --set stages.0.vae="$MODELS/vae"

step "8/8 summary"
python -m manifests.summary --root "$RUN" --train "$OUT/train" --json "$OUT/summary.json"
