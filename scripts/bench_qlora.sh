#!/usr/bin/env bash
# The memory and speed table of full fine-tuning vs LoRA vs QLoRA (docs/benchmarks.md, "Fine-tuning on a
# small card"). Usage: bash scripts/bench_qlora.sh [OUT.jsonl]; each line of OUT is one scripts/bench.py result
# with the variant's name. Two parts:
#   memory: the Llama-3.2-1B shape (configs/llama32_1b.py, random weights), compiled only: the state's sizes
#           (params as stored, trained params, optimizer state) and XLA's memory analysis of the train step
#           (batch 1 x 512, bf16 compute) on the backend it runs on;
#   speed:  a ~135M model of SmolLM2-135M's shape (30 layers, d=576, 9 heads, 3 KV heads, vocab 49152),
#           float32, batch 4 x 256, timed on this machine.
set -euo pipefail
OUT=${1:-runs/bench_qlora.jsonl}
mkdir -p "$(dirname "$OUT")"
: > "$OUT"
variants=(
  "full|--config.finetune.lora.rank=0"
  "lora-r16|--config.finetune.lora.rank=16"
  "qlora-nf4-r16|--config.finetune.lora.rank=16 --config.finetune.lora.quantize=nf4"
  "qlora-int8-r16|--config.finetune.lora.rank=16 --config.finetune.lora.quantize=int8"
)
run() {  # run NAME PART ARGS...
  local name=$1 part=$2; shift 2
  local line
  line=$(python scripts/bench.py "$@" | tail -1)
  python -c "import json, sys; row = json.loads(sys.argv[1]); print(json.dumps({'variant': sys.argv[2], 'part': sys.argv[3], **row}))" \
    "$line" "$name" "$part" | tee -a "$OUT"
}
for v in "${variants[@]}"; do
  name=${v%%|*}; args=${v#*|}
  # shellcheck disable=SC2086
  run "$name" memory --config configs/llama32_1b.py --stage finetune --compile_only $args \
    --config.model.sequence_length=512 --config.model.remat=none --config.finetune.train.batch_size=1
done
run "bf16-params" memory --config configs/llama32_1b.py --stage finetune --compile_only \
  --config.model.param_dtype=bfloat16 --config.model.sequence_length=512 --config.model.remat=none \
  --config.finetune.train.batch_size=1
smol=(--config configs/bench_cpu.py --stage finetune --steps 5 --warmup 1
      --config.model.n_layer=30 --config.model.n_embd=576 --config.model.n_head=9 --config.model.n_kv_head=3
      --config.model.head_dim=64 --config.model.mlp_hidden=1536 --config.model.vocab_size=49152
      --config.model.rope_theta=100000 --config.model.sequence_length=256 --config.model.dtype=float32
      --config.finetune.train.batch_size=4 --config.finetune.train.grad_accum=1)
for v in "${variants[@]}"; do
  name=${v%%|*}; args=${v#*|}
  # shellcheck disable=SC2086
  run "$name" speed "${smol[@]}" $args
done
