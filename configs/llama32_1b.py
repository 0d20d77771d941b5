"""The shape of Llama-3.2-1B (16 layers, d=2048, 32 heads, 8 KV heads, head size 64, SwiGLU 8192, vocab 128256,
tied, rope_theta 500000 with llama3 scaling), for memory and speed planning without its weights.

To fine-tune the real model, import it instead: `--config.finetune.init_from=hf:/path/to/Llama-3.2-1B` (the
shape and tokenizer then come from its config.json, jaxllm/pretrained.py). Here the weights are random, which
is all `scripts/bench.py --compile_only` (what a step needs on a card) and throughput figures need:
  python scripts/bench.py --config configs/llama32_1b.py --compile_only
  python scripts/bench.py --config configs/llama32_1b.py --stage finetune --config.finetune.lora.rank=16 --compile_only
"""

from jaxllm.config import default_config


def get_config():
    c = default_config()
    c.model.update(n_layer=16, n_embd=2048, n_head=32, n_kv_head=8, head_dim=64, mlp_hidden=8192,
                   vocab_size=128256, sequence_length=2048, norm_eps=1e-5, rope_theta=500000.0,
                   rope_scaling="llama3", rope_scaling_factor=32.0, rope_low_freq_factor=1.0,
                   rope_high_freq_factor=4.0, rope_original_max_len=8192, tie_embeddings=True,
                   dtype="bfloat16", remat="full")
    c.data.tokenizer = "byte"  # unused by the benchmark (random tokens); a real run imports Llama 3's tokenizer
    c.train.update(batch_size=4, grad_accum=1)
    c.finetune.train.update(batch_size=4, grad_accum=1)
    c.stages = "finetune"
    c.finetune.init_from = "hf:meta-llama/Llama-3.2-1B"
    c.finetune.lora.alpha = 16.0
    return c
