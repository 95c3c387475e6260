#!/bin/bash
# Multi-node SFT (or DPO) with fusechat on Slurm: one task per node, 8 GPUs each, DeepSpeed ZeRO-3.
#
#   sbatch scripts/slurm_train.sh configs/llama-3.1-8b.yaml sft       # or: ... dpo
#
# Every node runs the same `fusechat` command. It resolves the same config and input versions on the shared
# filesystem (so all nodes agree on one partial version directory), then relaunches itself under
# `accelerate launch` with this node's rank, taken from FUSECHAT_ACCELERATE_ARGS. Machine rank 0 commits the
# version when training ends; a re-submitted job resumes from the last checkpoint in the partial version.
#
# Any number of nodes trains with the recipe's `global_batch_size` (128): fusechat derives per-device batch x
# gradient accumulation for nodes x GPUS_PER_NODE processes (2 nodes: 16 processes x 8 examples each, e.g. 2 x 4),
# and stops with a one-line error before training when the global batch does not split over them (3 nodes: 24).
#SBATCH --job-name=fusechat-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --output=logs/%x-%j.out

set -euo pipefail
CONFIG=${1:?usage: slurm_train.sh CONFIG sft|dpo [fusechat options...]}
STAGE=${2:-sft}
shift 2 || true

GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export NCCL_ASYNC_ERROR_HANDLING=1

# $SLURM_NODEID must be expanded on each node, hence the single quotes inside bash -c.
srun --kill-on-bad-exit=1 bash -c '
  export FUSECHAT_ACCELERATE_ARGS="--num_machines '"$SLURM_NNODES"' --machine_rank $SLURM_NODEID \
    --main_process_ip '"$HEAD"' --main_process_port 29500 --rdzv_backend c10d"
  fusechat '"$STAGE"' -c '"$CONFIG"' \
    --set '"$STAGE"'.accelerate_config=zero3 \
    --set '"$STAGE"'.num_processes='"$((SLURM_NNODES * GPUS_PER_NODE))"' '"$*"'
'
