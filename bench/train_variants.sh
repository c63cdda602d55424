#!/usr/bin/env bash
# Post-trains the comparison variants of bench/eval_mt10.py next to `make train`'s world models (not a test):
#   posttrain-<task>-reactive          the reactive baseline (same network, demos, steps; no video prediction)
#   posttrain-<task>-demos10           the world model on the first 10 demos of the task
#   posttrain-<task>-reactive-demos10  the baseline on the same 10 demos
#   posttrain-<task>-fdm               the world model with L_fdm (weight 1): what async (Alg. 2) needs, for async vs sync
# Same init (data/runs/pretrain/model) and schedule (steps, lr, warmup, L_fdm weight, packing, ZeRO stage, EMA) as the
# posttrain@<task> DVC stages (params.yaml).
# Usage: bench/train_variants.sh [variant ...] -- [task ...]   (default: all variants, all MT10 tasks)
# Registered as lingbot-va-<task>[-reactive][-demos10], so they never take the deployed model's alias.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" TORCH_EXTENSIONS_DIR="$PWD/.cache/torch_extensions"
read -r steps lr warmup fdm budget rows zero nproc ema < <(python -c "import yaml; p = yaml.safe_load(open('params.yaml'))['posttrain']; \
print(p['steps'], p['lr'], p['warmup_steps'], p['fdm_loss_weight'], p['token_budget'], p['rows'], p['zero_stage'], p['nproc'], p['ema_decay'])")
variants=() tasks=()
while [[ $# -gt 0 && $1 != -- ]]; do variants+=("$1"); shift; done
[[ $# -gt 0 ]] && shift
tasks=("$@")
[[ ${#variants[@]} -eq 0 ]] && variants=(reactive demos10 reactive-demos10 fdm)
[[ ${#tasks[@]} -eq 0 ]] && mapfile -t tasks < <(python -c "import yaml; print(*yaml.safe_load(open('params.yaml'))['posttrain']['tasks'], sep='\n')")
for task in "${tasks[@]}"; do
  for variant in "${variants[@]}"; do
    case $variant in
      reactive) flags=(--objective reactive) ;;
      demos10) flags=(--demos 10) ;;
      reactive-demos10) flags=(--objective reactive --demos 10) ;;
      fdm) flags=(--fdm-loss-weight 1.0) ;;
      *) echo "unknown variant $variant (reactive | demos10 | reactive-demos10 | fdm)" >&2; exit 2 ;;
    esac
    out=data/runs/posttrain-$task-$variant
    if [[ -f $out/model/config.json ]]; then echo "skip $out (exists)"; continue; fi
    start=$(date +%s)
    torchrun --standalone --nproc_per_node "$nproc" -m pipelines.cli train posttrain --task "$task" \
      --init-from data/runs/pretrain/model --steps "$steps" --lr "$lr" --warmup-steps "$warmup" --fdm-loss-weight "$fdm" \
      --token-budget "$budget" --rows "$rows" --zero-stage "$zero" --ema-decay "$ema" --data-dir data --run-dir "$out" \
      "${flags[@]}"
    echo "trained $out in $(( $(date +%s) - start )) s"
  done
done
