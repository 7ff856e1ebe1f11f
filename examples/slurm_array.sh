#!/usr/bin/env bash
# Embed a large image set with a Slurm job array: one shard per task, then one merge job that
# starts when every task has finished. Preempted or failed tasks can simply be resubmitted:
# --resume creates, continues or (already complete) skips each shard.
#
#   bash examples/slurm_array.sh /data/images /scratch/feats.h5 64
set -euo pipefail
INPUTS=${1:?image directory or list}
OUT=${2:?output, e.g. /scratch/feats.h5}
N=${3:-16}

array=$(sbatch --parsable --array="0-$((N - 1))" --gres=gpu:1 --cpus-per-task=8 \
  --job-name=dinoreg-embed --wrap \
  "dinoreg embed '$INPUTS' --out '$OUT' --shard \$SLURM_ARRAY_TASK_ID/$N --resume --quiet")

stem="${OUT%.*}"; suffix="${OUT##*.}"
sbatch --dependency="afterok:$array" --job-name=dinoreg-merge --wrap \
  "dinoreg merge ${stem}-*-of-$(printf %05d "$N").${suffix} --out '$OUT'"
echo "submitted array $array ($N shards) and its merge"
