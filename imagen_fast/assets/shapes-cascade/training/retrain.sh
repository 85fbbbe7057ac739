#!/usr/bin/env bash
# Retrain the shipped shapes cascade from nothing, on a CPU, with imagen-fast's own commands.
# Run from an empty working directory; STEPS_BASE / STEPS_SR / STEPS_SR256 are the shipped
# checkpoints' steps (see ../README.md). The first two stages train at the same time, one core
# each; the 64 -> 256 stage (trained on crops, independent of the others) after them.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
STEPS_BASE="${STEPS_BASE:?set STEPS_BASE (the steps of the shipped base stage, in ../README.md)}"
STEPS_SR="${STEPS_SR:?set STEPS_SR (the steps of the shipped SR stage, in ../README.md)}"
STEPS_SR256="${STEPS_SR256:?set STEPS_SR256 (the steps of the shipped 64->256 stage, in ../README.md)}"

# 1. data: 200k 64x64 shapes images without the held-out caption combinations, and
#    their MiniLM caption embeddings (encoded once; the encoder is frozen)
imagen-fast data shapes --out data/shapes64 --num 200000 --resolution 64 --split train
imagen-fast data cache --data data/shapes64 --out data/shapes64-minilm --encoder minilm
#    the first 100k of the same scenes rendered at 256 px, for the 64 -> 256 stage (it
#    trains on random 64 px crops: 2401 aligned places per image)
imagen-fast data shapes --out data/shapes256 --num 100000 --resolution 256 --split train
imagen-fast data cache --data data/shapes256 --out data/shapes256-minilm --encoder minilm

# 2. the two stages (constant LR after warmup, so a run of N steps is the first N steps
#    of the shipped one); rerun with --resume after an interruption
OMP_NUM_THREADS=1 imagen-fast train --config "$HERE/base32.toml" --set train.steps="$STEPS_BASE" &
OMP_NUM_THREADS=1 imagen-fast train --config "$HERE/sr64.toml" --set train.steps="$STEPS_SR" &
wait
OMP_NUM_THREADS=1 imagen-fast train --config "$HERE/sr256.toml" --set train.steps="$STEPS_SR256"

# 3. the cascade: EMA weights in fp16, with the shipped sampling defaults
imagen-fast export --run runs/base32 --run runs/sr64 --out shapes-cascade \
    --sampling "$(cat "$HERE/sampling.json")"
