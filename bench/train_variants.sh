#!/usr/bin/env bash
# Post-trains the comparison variants of bench/eval_mt10.py next to `make train`'s world models (not a test):
#   posttrain-<task>-reactive          the reactive baseline (same network, demos, steps; no video prediction)
#   posttrain-<task>-demos10           the world model on the first 10 demos of the task
#   posttrain-<task>-reactive-demos10  the baseline on the same 10 demos
#     Both start from a pretraining that never saw the task (the paper's low-data setting: its pretraining corpus
#     holds none of the target tasks; `make train`'s pretraining holds all 50 demos of every MT10 task, which would
#     make "10 demos" meaningless). MT10 is split in two halves by position, a = 1st, 3rd, ... task, b = the others,
#     so each half's pretraining keeps the sibling of every held-out task (reach / push, drawer-open / -close, ...):
#     data/runs/pretrain-heldout-<half> is pretrained on the other half's tasks with the pretrain stage's schedule,
#     trained here first when missing (~16 min).
#   posttrain-<task>-fdm               the world model with L_fdm (weight 1): what async (Alg. 2) needs, for async vs sync
# Same init (data/runs/pretrain/model) and schedule (steps, lr, warmup, L_fdm weight, packing, ZeRO stage, EMA) as the
# posttrain@<task> DVC stages (params.yaml).
# Usage: bench/train_variants.sh [variant ...] -- [task ...]   (default: all variants, all MT10 tasks)
# Registered as lingbot-va-<task>[-reactive][-demos10], so they never take the deployed model's alias.
# Learning curves (bench/learning_curve.py): STEPS=480 SNAPSHOT_EVERY=120 RUN_SUFFIX=-curve480 bench/train_variants.sh
#   demos10 -- door-open-v3  trains data/runs/posttrain-door-open-v3-demos10-curve480 with a snapshot every 120 steps.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" TORCH_EXTENSIONS_DIR="$PWD/.cache/torch_extensions"
read -r psteps plr pwarmup pbudget prows pzero pema ppreset < <(python -c "import yaml; p = yaml.safe_load(open('params.yaml'))['pretrain']; \
print(p['steps'], p['lr'], p['warmup_steps'], p['token_budget'], p['rows'], p['zero_stage'], p['ema_decay'], p['preset'])")
read -r steps lr warmup fdm budget rows zero nproc ema < <(python -c "import yaml; p = yaml.safe_load(open('params.yaml'))['posttrain']; \
print(p['steps'], p['lr'], p['warmup_steps'], p['fdm_loss_weight'], p['token_budget'], p['rows'], p['zero_stage'], p['nproc'], p['ema_decay'])")
variants=() tasks=()
while [[ $# -gt 0 && $1 != -- ]]; do variants+=("$1"); shift; done
[[ $# -gt 0 ]] && shift
tasks=("$@")
[[ ${#variants[@]} -eq 0 ]] && variants=(reactive demos10 reactive-demos10 fdm)
mapfile -t mt10 < <(python -c "import yaml; print(*yaml.safe_load(open('params.yaml'))['posttrain']['tasks'], sep='\n')")
[[ ${#tasks[@]} -eq 0 ]] && tasks=("${mt10[@]}")
steps=${STEPS:-$steps}
snapshots=()
[[ -n ${SNAPSHOT_EVERY:-} ]] && snapshots=(--snapshot-every "$SNAPSHOT_EVERY")

# the held-out pretraining for $1's half (prints its model dir), trained on the other half's tasks when missing
heldout_init() {
  local task=$1 half="" excluded=() i
  for i in "${!mt10[@]}"; do [[ ${mt10[$i]} == "$task" ]] && half=$(( i % 2 == 0 ? 0 : 1 )); done
  [[ -z $half ]] && { echo "$task is not one of params.yaml's posttrain tasks" >&2; return 2; }
  for i in "${!mt10[@]}"; do (( i % 2 == half )) && excluded+=("${mt10[$i]}"); done
  local name; name=pretrain-heldout-$([[ $half == 0 ]] && echo a || echo b)
  local dir=data/runs/$name
  if [[ ! -f $dir/model/config.json ]]; then
    echo "pretraining $dir without $(IFS=,; echo "${excluded[*]}")" >&2
    start=$(date +%s)
    torchrun --standalone --nproc_per_node "$nproc" -m pipelines.cli train pretrain --preset "$ppreset" \
      --steps "$psteps" --lr "$plr" --warmup-steps "$pwarmup" --token-budget "$pbudget" --rows "$prows" \
      --zero-stage "$pzero" --ema-decay "$pema" --exclude-tasks "$(IFS=,; echo "${excluded[*]}")" --no-register \
      --data-dir data --run-dir "$dir" >&2
    echo "trained $dir in $(( $(date +%s) - start )) s" >&2
  fi
  echo "$dir/model"
}
for task in "${tasks[@]}"; do
  for variant in "${variants[@]}"; do
    case $variant in
      reactive) flags=(--objective reactive) ;;
      demos10) flags=(--demos 10) ;;
      reactive-demos10) flags=(--objective reactive --demos 10) ;;
      fdm) flags=(--fdm-loss-weight 1.0) ;;
      *) echo "unknown variant $variant (reactive | demos10 | reactive-demos10 | fdm)" >&2; exit 2 ;;
    esac
    out=data/runs/posttrain-$task-$variant${RUN_SUFFIX:-}
    if [[ -f $out/model/config.json ]]; then echo "skip $out (exists)"; continue; fi
    init=data/runs/pretrain/model
    [[ $variant == *demos10 ]] && init=$(heldout_init "$task")
    start=$(date +%s)
    torchrun --standalone --nproc_per_node "$nproc" -m pipelines.cli train posttrain --task "$task" \
      --init-from "$init" --steps "$steps" --lr "$lr" --warmup-steps "$warmup" --fdm-loss-weight "$fdm" \
      --token-budget "$budget" --rows "$rows" --zero-stage "$zero" --ema-decay "$ema" --data-dir data --run-dir "$out" \
      "${flags[@]}" "${snapshots[@]}"
    echo "trained $out in $(( $(date +%s) - start )) s"
  done
done
