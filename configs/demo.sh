#!/usr/bin/env bash
# The demo pipeline that `make demo` runs (and tests/test_demo.py runs on a smaller corpus):
# corpus → tiny models → curation → captioning → selection → training shards → training → sampling →
# evaluation → summary.
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

step "1/10 demo corpus ($N good images + one of each bad kind) → $OUT/corpus"
python -m curation.demo_corpus --output "$OUT/corpus" --num-images "$N" --seed "$SEED"

step "2/10 tiny models built offline → $MODELS"
[ -f "$MODELS/t5/config.json" ] || python -m training.tiny --output "$MODELS"
[ -f "$MODELS/llava/config.json" ] || python -m captioning.tiny --output "$MODELS"
[ -f "$MODELS/clip/open_clip_model.safetensors" ] || python -m curation.tiny --output "$MODELS"
[ -f "$MODELS/inception/pt_inception-random.pth" ] || python -m training.tiny_inception --output "$MODELS"

step "3/10 curation → $RUN (tiny random CLIP: no aesthetic threshold, no semantic dedup)"
# Tiny random CLIP under the real LAION head: its scores mean nothing, so no aesthetic threshold; and its
# embeddings of distinct pictures are alike (cosine ≥ 0.95 for most pairs), so semantic dedup, on by default,
# would keep one picture: turned off here (the log says so). Exact and pHash dedup still run.
python curation/run.py --input "$OUT/corpus" --output "$RUN" --samples-per-shard 8 \
    --clip-model "local-dir:$MODELS/clip" \
    --min-aesthetic none --no-semantic-dedup

step "4/10 captioning (tiny LLaVA) → $RUN/manifests/captions"
python captioning/run.py --input "$RUN" --model "$MODELS/llava" --tokenizer "$MODELS/t5" --preset debug

step "5/10 eval set (held out by key, sha256 and pHash group), then the training selection"
python -m manifests.evalset --input "$RUN" --name eval --num-samples 4 --samples-per-shard 4
python -m manifests.selection --input "$RUN" --name demo --exclude eval \
    --where "caption_orig IS NOT NULL OR caption_vlm IS NOT NULL"

step "6/10 training shards with cached T5 features and SDXL-like VAE latents at 32 and 64 px"
# The SD-like VAE of the debug schedule's first stage is not cached: that stage encodes on the fly (vae_on_the_fly).
python -m manifests.materialize --input "$RUN" --selection demo --samples-per-shard 4 \
    --t5 "$MODELS/t5" --vae "$MODELS/vae" --vae-resolution 32 --vae-resolution 64

step "7/10 training: torchrun --nproc_per_node=$NPROC training/main.py --config $CONFIG"
# Every stage's VAE path is overridden: stages whose VAE is "vae_sd" get the SD-like one, the rest SDXL-like.
VAE_SETS=()
i=0
for vae in $(python -c "from training.config import load_config; print(' '.join(s.vae for s in load_config('$CONFIG').stages))"); do
    VAE_SETS+=(--set "stages.$i.vae=$MODELS/$(basename "$vae")")
    i=$((i + 1))
done
torchrun --standalone --nproc_per_node="$NPROC" training/main.py --config "$CONFIG" --output "$OUT/train" \
    --set data.shards="$RUN/train_shards/demo" --set text.t5="$MODELS/t5" "${VAE_SETS[@]}"

step "8/10 sampling the eval prompts from the trained model (EMA weights, DPM-Solver++) → $OUT/samples"
python -m training.sample --model "$OUT/train" --input "$RUN/eval_shards/eval/prompts.jsonl" \
    --output "$OUT/samples" --steps 10 --overwrite
# A standalone PixArtSigmaPipeline of the final KV model: plain diffusers samples it (README, three lines).
python -m training.export --input "$OUT/train" --output "$OUT/pipeline" --standalone

step "9/10 FID / CLIP score on the eval set (random Inception, tiny CLIP: real code paths, meaningless values)"
# --allow-small-fid: the demo's eval set has a handful of images, far below the 2048 per side a reportable
# FID needs; the flag computes it anyway and marks it "trend only" in metrics.json and the summary.
python -m training.evaluate --model "$OUT/train" --input "$RUN/eval_shards/eval" --steps 10 --allow-small-fid \
    --inception "$MODELS/inception/pt_inception-random.pth" --clip-model "local-dir:$MODELS/clip"

step "10/10 summary"
python -m manifests.summary --input "$RUN" --train "$OUT/train" --samples "$OUT/samples" --output "$OUT/summary.json"
