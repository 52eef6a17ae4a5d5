#!/usr/bin/env bash
# Multi-node training under SLURM: one deepspeed launcher per node (srun), joined through a
# hostfile and --no_ssh --node_rank (no pdsh/ssh between nodes needed).
#
#   sbatch --nodes 4 launch/slurm_train.sh --ds_config ds_configs/zero3_bf16.json --method bidora \
#       --model_name_or_path /models/llama --dataset data.jsonl --output_dir runs/llama-bidora
#
# Arguments are passed to launch/train.py. The working directory, output_dir and the
# hostfile must be on a filesystem every node sees. See docs/cluster.md.
#SBATCH --job-name=ds_bilevel
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
NODES=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${MASTER_ADDR:-$(echo "$NODES" | head -n 1)}
MASTER_PORT=${MASTER_PORT:-29500}
HOSTFILE=${HOSTFILE:-$PWD/hostfile.${SLURM_JOB_ID:-local}}
echo "$NODES" | sed "s/\$/ slots=$GPUS_PER_NODE/" > "$HOSTFILE"
echo "ds_bilevel: $(echo "$NODES" | wc -l) nodes x $GPUS_PER_NODE ranks, master $MASTER_ADDR:$MASTER_PORT"

# One task per node; each starts the local ranks of its node. A failing node ends the job.
ARGS=$(printf ' %q' "$@")
srun --kill-on-bad-exit=1 bash -c "deepspeed --hostfile '$HOSTFILE' --no_ssh --node_rank \$SLURM_NODEID \
    --master_addr '$MASTER_ADDR' --master_port '$MASTER_PORT' launch/train.py $ARGS"
