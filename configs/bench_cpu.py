"""The CPU throughput benchmark: llama 4L/256/4h, SwiGLU, vocab 50304, seq 256, batch 8, AdamW.

The same model and step as scripts/bench_torch.py, for comparing jaxllm with PyTorch on one machine.
Compute settings are the fastest measured here (docs/benchmarks.md): bf16 matmuls with float32
accumulation and the fused, chunked LM head + cross-entropy.
`python scripts/bench.py --config configs/bench_cpu.py`
"""

from jaxllm.config import default_config


def get_config():
    c = default_config()
    c.model.name = "llama"
    c.model.n_layer, c.model.n_embd, c.model.n_head = 4, 256, 4
    c.model.vocab_size = 50304
    c.model.sequence_length = 256
    c.model.dtype = "bfloat16"  # params stay float32; norms, softmax and loss float32
    c.loss.head_chunk = 256  # tokens per chunk of the fused LM head + cross-entropy

    c.data.source = "synthetic"
    c.data.tokenizer = "gpt2"

    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.optim.grad_clip = 1.0

    c.train.steps = 1000
    c.train.batch_size = 8
    c.train.grad_accum = 1
    c.train.num_devices = 1
    return c
