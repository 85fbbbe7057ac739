#!/usr/bin/env bash
# Retrain the shipped shapes cascade from nothing, on a CPU, with imagen-fast's own commands.
# Run from an empty working directory; STEPS_BASE / STEPS_SR default to the shipped
# checkpoint's steps (see ../README.md). The two stages train at the same time, one core each.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
STEPS_BASE="${STEPS_BASE:?set STEPS_BASE (the shipped base stage's steps, in ../README.md)}"
STEPS_SR="${STEPS_SR:?set STEPS_SR (the shipped SR stage's steps, in ../README.md)}"

# 1. data: 200k 64x64 shapes images without the held-out caption combinations, and
#    their MiniLM caption embeddings (encoded once; the encoder is frozen)
imagen-fast data shapes --out data/shapes64 --num 200000 --resolution 64 --split train
imagen-fast data cache --data data/shapes64 --out data/shapes64-minilm --encoder minilm

# 2. the two stages (constant LR after warmup, so a run of N steps is the first N steps
#    of the shipped one); rerun with --resume after an interruption
OMP_NUM_THREADS=1 imagen-fast train --config "$HERE/base32.toml" --set train.steps="$STEPS_BASE" &
OMP_NUM_THREADS=1 imagen-fast train --config "$HERE/sr64.toml" --set train.steps="$STEPS_SR" &
wait

# 3. the cascade: EMA weights in fp16, with the shipped sampling defaults
imagen-fast export --run runs/base32 --run runs/sr64 --out shapes-cascade \
    --sampling "$(cat "$HERE/sampling.json")"
