#!/usr/bin/env bash
# The toy-world run through the real pipeline (issue 21): toy corpus → curation → eval set + selection →
# training shards with cached toy-T5 and toy-VAE features → torchrun training/main.py --config configs/toy.toml.
# The captions are the truth (manifests.toy): no captioning step, the trainer reads caption_orig only
# (real_prompt_ratio = 1.0), and the eval set's prompts are the captions, so evaluation scores adherence.
# Environment (defaults below): TOY_OUT, TOY_N, TOY_SEED, TOY_CONFIG, NPROC; TOY_SQUARE (1: square scenes only, for
# runs on a few scenes, where each aspect ratio's bucket would otherwise name its scene); TOY_MODELS (the toy T5, tiny CLIP and
# Inception; built there when absent); TOY_EVAL (held-out eval scenes, never trained on); TOY_SEEN (when > 0, an eval
# set "seen" of that many training scenes, to score what the run memorised beside what it generalised); TOY_VAE (a
# folder holding sd/ and sdxl/, default the toy VAEs shipped in assets/toy_vae, built with `python -m
# training.toy_vae` when absent: one toy VAE throughout, the one the config's stages name); extra --set
# overrides in TOY_SETS.
set -euo pipefail
OUT=${TOY_OUT:-toy_out}
N=${TOY_N:-96}
SEED=${TOY_SEED:-0}
CONFIG=${TOY_CONFIG:-configs/toy.toml}
NPROC=${NPROC:-1}
RUN=$OUT/run
MODELS=${TOY_MODELS:-$OUT/models}
TOY_EVAL=${TOY_EVAL:-8}
TOY_VAE=${TOY_VAE:-assets/toy_vae}
TOY_SEEN=${TOY_SEEN:-0}
TOY_SQUARE=${TOY_SQUARE:-0}
read -r -a EXTRA_SETS <<<"${TOY_SETS:-}"
# From the config and TOY_SETS (training.config.toy_run_plan): its one toy VAE (sd or sdxl), the number of stages,
# their resolutions. ${a[@]+"${a[@]}"}: an empty array under set -u on bash < 4.4 too (macOS's /bin/bash).
PLAN=$(python -c "import sys
from training.config import load_config, toy_run_plan
kind, num_stages, resolutions = toy_run_plan(load_config('$CONFIG', overrides=sys.argv[1:]))
print(kind, num_stages, *resolutions)" ${EXTRA_SETS[@]+"${EXTRA_SETS[@]}"})
read -r VAE_KIND NUM_STAGES RESOLUTIONS <<<"$PLAN"
step() { printf '\n== %s\n' "$*"; }

step "1/6 toy world ($N scenes, seed $SEED, ≥ 1K a side) → $OUT/corpus"
# Generated at ≥ 1K so curation's real tier rule keeps them (PixArt-Σ §3.2); materialize resizes them to the
# training buckets (aspect ratios every bucket table holds exactly: the crop never moves an object).
# TOY_OUT/toy.args records the corpus's settings and the run's: a corpus made with other settings is made again
# and the run over it redone; a run made with other settings (eval split, config, VAE, --set overrides) is redone
# on the same corpus. A folder this script did not make is refused, never removed.
CORPUS_ARGS="--num $N --seed $SEED"
[ "$TOY_SQUARE" = 1 ] && CORPUS_ARGS="$CORPUS_ARGS --square"
RUN_ARGS="config=$CONFIG eval=$TOY_EVAL seen=$TOY_SEEN vae=$TOY_VAE sets=${TOY_SETS:-}"
STAMP=$OUT/toy.args
if [ -f "$STAMP" ]; then
    if [ "$(sed -n 1p "$STAMP")" != "$CORPUS_ARGS" ]; then
        echo "toy.sh: $OUT's corpus was made with '$(sed -n 1p "$STAMP")', now '$CORPUS_ARGS': removing its corpus, run and training"
        rm -rf "$OUT/corpus" "$RUN" "$OUT/train"
    elif [ "$(sed -n 2p "$STAMP")" != "$RUN_ARGS" ]; then
        echo "toy.sh: $OUT's run was made with '$(sed -n 2p "$STAMP")', now '$RUN_ARGS': removing its run and training"
        rm -rf "$RUN" "$OUT/train"
    fi
elif [ -e "$OUT/corpus" ] || [ -e "$RUN" ] || [ -e "$OUT/train" ]; then
    echo "toy.sh: $OUT holds corpus/, run/ or train/ but no toy.args (not a toy run this script made): remove them or set another TOY_OUT" >&2
    exit 2
fi
mkdir -p "$OUT"
printf '%s\n%s\n' "$CORPUS_ARGS" "$RUN_ARGS" >"$STAMP"
# shellcheck disable=SC2086  # CORPUS_ARGS is a list of flags
[ -f "$OUT/corpus/truth.jsonl" ] || python -m curation.toy_world --output "$OUT/corpus" $CORPUS_ARGS

step "2/6 models built offline → $MODELS (toy T5, tiny CLIP and Inception; toy VAEs in $TOY_VAE)"
[ -f "$MODELS/toy_t5/config.json" ] || python -m training.tiny --output "$MODELS"
[ -f "$MODELS/clip/open_clip_model.safetensors" ] || python -m curation.tiny --output "$MODELS"
[ -f "$MODELS/inception/pt_inception-random.pth" ] || python -m training.tiny_inception --output "$MODELS"
[ -f "$TOY_VAE/$VAE_KIND/config.json" ] || python -m training.toy_vae --output "$TOY_VAE" --vae "$VAE_KIND"

step "3/6 curation → $RUN (random CLIP: no aesthetic threshold, no semantic dedup; pHash at 0 bits)"
# Tiny random CLIP: its scores and embeddings mean nothing (no aesthetic threshold, SemDeDup off, as in the
# demo). pHash: distinct toy scenes are flat grey fields with a few small shapes, so their 64-bit pHashes sit
# close (at the default 4 bits pHash rejected 2 of 60 distinct scenes): only identical hashes are duplicates.
python curation/run.py --input "$OUT/corpus" --output "$RUN" --samples-per-shard 32 \
    --clip-model "local-dir:$MODELS/clip" --min-aesthetic none --no-semantic-dedup --max-hamming 0 --no-report

step "4/6 eval set (prompts = captions = truth), then the training selection"
python -m manifests.evalset --input "$RUN" --name eval --num-samples "$TOY_EVAL" --samples-per-shard 8 --prompt orig \
    --phash-max-distance 0
if [ "$TOY_SEEN" -gt 0 ]; then  # drawn from the rows the training selection below keeps: scenes it trains on
    python -m manifests.evalset --input "$RUN" --name seen --num-samples "$TOY_SEEN" --samples-per-shard 8 \
        --prompt orig --exclude eval --phash-max-distance 0
fi
python -m manifests.selection --input "$RUN" --name toy --exclude eval --phash-max-distance 0 \
    --where "caption_orig IS NOT NULL"

step "5/6 training shards with cached toy-T5 features and toy-VAE latents at the config's stage resolutions"
VAE_RESOLUTIONS=()
for res in $RESOLUTIONS; do
    VAE_RESOLUTIONS+=(--vae-resolution "$res")
done
python -m manifests.materialize --input "$RUN" --selection toy --samples-per-shard 32 \
    --t5 "$MODELS/toy_t5" --vae "$TOY_VAE/$VAE_KIND" "${VAE_RESOLUTIONS[@]}"

step "6/6 training: torchrun --nproc_per_node=$NPROC training/main.py --config $CONFIG"
SCALING=$(python -c "import json; print(json.load(open('$TOY_VAE/$VAE_KIND/config.json'))['scaling_factor'])")
VAE_SETS=()
for ((i = 0; i < NUM_STAGES; i++)); do
    VAE_SETS+=(--set "stages.$i.vae=$TOY_VAE/$VAE_KIND" --set "stages.$i.vae_scaling_factor=$SCALING")
done
torchrun --standalone --nproc_per_node="$NPROC" training/main.py --config "$CONFIG" --output "$OUT/train" \
    --set data.shards="$RUN/train_shards/toy" --set text.t5="$MODELS/toy_t5" \
    --set evaluation.eval_set="$RUN/eval_shards/eval" \
    --set evaluation.inception="$MODELS/inception/pt_inception-random.pth" \
    --set evaluation.clip_model="local-dir:$MODELS/clip" "${VAE_SETS[@]}" ${EXTRA_SETS[@]+"${EXTRA_SETS[@]/#/--set=}"}
