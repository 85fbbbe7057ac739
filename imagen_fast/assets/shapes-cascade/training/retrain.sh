#!/usr/bin/env bash
# Retrain the shipped shapes cascade from nothing, on a CPU, with imagen-fast's own commands.
# Run from an empty working directory; STEPS_BASE / STEPS_SR / STEPS_SR256 are the shipped
# checkpoints' steps (see ../README.md). The first two stages train at the same time, one core
# each; the 64 -> 256 stage (trained on crops, independent of the others) after them.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
STEPS_BASE="${STEPS_BASE:?set STEPS_BASE (the steps of the shipped base stage, in ../README.md)}"
STEPS_SR="${STEPS_SR:?set STEPS_SR (the steps of the shipped SR stage, in ../README.md)}"
STEPS_SR256="${STEPS_SR256:?set STEPS_SR256 (the steps of the 64->256 stage, first phase, in ../README.md)}"
STEPS_SR256_TAIL="${STEPS_SR256_TAIL:?set STEPS_SR256_TAIL (the last step of the 64->256 stage, second phase, in ../README.md)}"
STEPS_SR256_FT="${STEPS_SR256_FT:?set STEPS_SR256_FT (the steps of the 64->256 stage, third phase, in ../README.md)}"

# 1. data: 200k 64x64 shapes images without the held-out caption combinations, and
#    their MiniLM caption embeddings (encoded once; the encoder is frozen)
imagen-fast data shapes --out data/shapes64 --num 200000 --resolution 64 --split train
imagen-fast data cache --data data/shapes64 --out data/shapes64-minilm --encoder minilm
#    the first 100k of the same scenes rendered at 256 px, for the 64 -> 256 stage (it
#    trains on random 64 px crops: 2401 aligned places per image)
imagen-fast data shapes --out data/shapes256 --num 100000 --resolution 256 --split train
imagen-fast data cache --data data/shapes256 --out data/shapes256-minilm --encoder minilm
#    and the first 40k of them again, for the stage's third phase
imagen-fast data shapes --out data/shapes256-40k --num 40000 --resolution 256 --split train
imagen-fast data cache --data data/shapes256-40k --out data/shapes256-40k-minilm --encoder minilm

# 2. the two stages (constant LR after warmup, so a run of N steps is the first N steps
#    of the shipped one); rerun with --resume after an interruption
OMP_NUM_THREADS=1 imagen-fast train --config "$HERE/base32.toml" --set train.steps="$STEPS_BASE" &
OMP_NUM_THREADS=1 imagen-fast train --config "$HERE/sr64.toml" --set train.steps="$STEPS_SR" &
wait
#    the 64 -> 256 stage in three phases: t ~ U(0, 1) first, then resumed with t ~ U(0, 0.3)
#    (the times its truncated-start sampling visits), then a fine-tune of that run's EMA
#    weights with a fresh optimizer (runs/sr256ft; why: sr256-ft.toml)
OMP_NUM_THREADS=1 imagen-fast train --config "$HERE/sr256.toml" --set train.steps="$STEPS_SR256"
OMP_NUM_THREADS=1 imagen-fast train --config "$HERE/sr256-tail.toml" --resume \
    --set train.steps="$STEPS_SR256_TAIL"
OMP_NUM_THREADS=2 imagen-fast train --config "$HERE/sr256-ft.toml" --set train.steps="$STEPS_SR256_FT"

# 3. the cascade: EMA weights in fp16, with the shipped sampling defaults
imagen-fast export --run runs/base32 --run runs/sr64 --run runs/sr256ft --out shapes-cascade \
    --sampling "$(cat "$HERE/sampling.json")"
