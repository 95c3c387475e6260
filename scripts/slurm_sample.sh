#!/bin/bash
# Sampling and scoring with fusechat on Slurm: one job per source x shard, then one per score shard, then build.
#
#   bash scripts/slurm_sample.sh configs/llama-3.1-8b.yaml [fusechat options, e.g. --set workdir=/shared/runs]
#
# Run it on the login node, with the environment that has fusechat (it reads the config's sources and submits):
#   1. `fusechat prompts` (one CPU job; cached when the prompts version exists),
#   2. per model source, an array of SAMPLE_SHARDS jobs `fusechat sample --source S --shard I/N`, each on a node
#      of GPUS GPUs (fusechat runs one engine replica per tensor_parallel_size GPUs of the job: 4 of a 27B source
#      at tensor parallel 2 on 8 GPUs); a source with `engine: dataset` (no model) is one CPU job,
#   3. once every sample job succeeded, an array of SCORE_SHARDS jobs `fusechat score --shard I/N` (one scoring
#      process per GPU),
#   4. once they all succeeded, `fusechat build` (CPU).
# All jobs share one run directory on a shared filesystem: the sample jobs fill the sources' parts together (the
# last one to finish commits the samples version), the score jobs one scores version. A job that fails or is
# preempted loses at most its chunks in flight: submit the script again and only the missing chunks are done.
#
# Environment: SAMPLE_SHARDS (default 4), SCORE_SHARDS (2), GPUS per job (8), CPUS_PER_GPU (12), LOGS (logs/).
# sbatch's own variables apply to every job (SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT, ...).
set -euo pipefail
CONFIG=${1:?usage: slurm_sample.sh CONFIG [fusechat options...]}
shift
SAMPLE_SHARDS=${SAMPLE_SHARDS:-4}
SCORE_SHARDS=${SCORE_SHARDS:-2}
GPUS=${GPUS:-8}
CPUS_PER_GPU=${CPUS_PER_GPU:-12}
LOGS=${LOGS:-logs}
mkdir -p "$LOGS"

# Options for every fusechat command, quoted for the job scripts sbatch writes (--wrap runs them with sh).
OPTS=""
if [ $# -gt 0 ]; then OPTS=$(printf ' %q' "$@"); fi
CFG=$(printf '%q' "$CONFIG")

# "name engine" per source, with the same --set overrides the jobs get.
SOURCES=$(python3 - "$CONFIG" "$@" <<'EOF'
import sys

from fusechat.config import load_config
from fusechat.errors import UserError

args, sets = sys.argv[2:], []
for i, a in enumerate(args):
    if a == "--set" and i + 1 < len(args):
        sets.append(args[i + 1])
    elif a.startswith("--set="):
        sets.append(a.removeprefix("--set="))
try:
    sources = load_config(sys.argv[1], sets).sources
except UserError as e:
    sys.exit(f"error: {e}")
for s in sources:
    print(s.name, s.engine)
EOF
)

submit() {  # sbatch ARGS...: prints the job id
  sbatch --parsable "$@" | cut -d ';' -f 1
}
gpu_job=(--nodes=1 --ntasks=1 --gres="gpu:$GPUS" --cpus-per-task=$((GPUS * CPUS_PER_GPU)))
cpu_job=(--nodes=1 --ntasks=1 --cpus-per-task="$CPUS_PER_GPU")

prompts=$(submit "${cpu_job[@]}" --job-name=fusechat-prompts --output="$LOGS/%x-%j.out" \
  --wrap "fusechat prompts -c $CFG$OPTS")
echo "prompts: job $prompts"

samples=()
while read -r name engine; do
  [ -n "$name" ] || continue
  if [ "$engine" = dataset ]; then
    id=$(submit "${cpu_job[@]}" --dependency="afterok:$prompts" --job-name="fusechat-sample-$name" \
      --output="$LOGS/%x-%j.out" --wrap "fusechat sample -c $CFG --source $(printf '%q' "$name")$OPTS")
  else
    # \$SLURM_ARRAY_TASK_ID: expanded by each array task, not here
    id=$(submit "${gpu_job[@]}" --array="1-$SAMPLE_SHARDS" --dependency="afterok:$prompts" \
      --job-name="fusechat-sample-$name" --output="$LOGS/%x-%A_%a.out" \
      --wrap "fusechat sample -c $CFG --source $(printf '%q' "$name") --shard \$SLURM_ARRAY_TASK_ID/$SAMPLE_SHARDS$OPTS")
  fi
  echo "sample $name: job $id"
  samples+=("$id")
done <<<"$SOURCES"

after_samples=$(IFS=:; echo "afterok:${samples[*]}")
score=$(submit "${gpu_job[@]}" --array="1-$SCORE_SHARDS" --dependency="$after_samples" --job-name=fusechat-score \
  --output="$LOGS/%x-%A_%a.out" --wrap "fusechat score -c $CFG --shard \$SLURM_ARRAY_TASK_ID/$SCORE_SHARDS$OPTS")
echo "score: job $score"

build=$(submit "${cpu_job[@]}" --dependency="afterok:$score" --job-name=fusechat-build --output="$LOGS/%x-%j.out" \
  --wrap "fusechat build -c $CFG$OPTS")
echo "build: job $build (then: sbatch scripts/slurm_train.sh $CONFIG sft)"
