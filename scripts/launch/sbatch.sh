#!/bin/bash
# jsft on a SLURM cluster: one task per node, each task driving all GPUs of its node.
#
#   sbatch --nodes=2 scripts/launch/sbatch.sh --config configs/qwen2.5-0.5b-tool-sft.yaml model.path=/shared/ckpts/Qwen2.5-0.5B-Instruct
#
# Everything after the script name goes to `python -m jsft.train` unchanged. jsft reads what srun sets
# (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID) and calls
# jax.distributed.initialize with the first node of the step as coordinator (port: $JAX_COORDINATOR_PORT,
# or one derived from the job id). One task per node sees all of the node's GPUs; with one task per GPU
# (--ntasks-per-node=8 --gpus-per-task=1) each task sees its own.
#
# Paths on a filesystem every node shares: model.path, data.train_files / val_files, data.tokenizer,
# trainer.default_local_dir (checkpoints, run files; checked at start-up) and data.cache_dir (so that the
# nodes split tokenization; otherwise each tokenizes every row). Run from the repository (or with jsft
# installed) on that filesystem.
#SBATCH --job-name=jsft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=jsft-%j.out

set -euo pipefail

# a shared tokenization cache and a shared compilation cache for every node
export CACHE_ROOT="${CACHE_ROOT:-$PWD/.jsft-cache}"
# optional: export JAX_COORDINATOR_PORT=12345   (default: derived from the job id)

srun --kill-on-bad-exit=1 python -m jsft.train \
    data.cache_dir="$CACHE_ROOT/data" \
    trainer.compilation_cache_dir="$CACHE_ROOT/xla" \
    "$@"
