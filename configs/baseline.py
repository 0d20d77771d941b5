"""The reference baseline (llm-baselines): GPT-2 12L/768/12h, 124M params, on SlimPajama-6B.

32 x 4 x 512 tokens per step, AdamW lr 1e-3 with the one-cycle cosine schedule, 3-hour budget.
`python -m jaxllm.train --config configs/baseline.py`
"""

from jaxllm.config import default_config


def get_config():
    c = default_config()
    c.model.name = "gpt2"
    c.model.n_layer, c.model.n_embd, c.model.n_head = 12, 768, 12
    c.model.vocab_size = 50304
    c.model.sequence_length = 512
    c.model.dtype = "bfloat16"  # the reference trained under bf16 autocast; params stay float32

    c.data.source = "hub"
    c.data.path = "DKYoon/SlimPajama-6B"
    c.data.tokenizer = "gpt2"
    c.data.num_proc = 8

    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.optim.schedule = "cos"
    c.optim.grad_clip = 0.0  # the reference default: no clipping

    c.train.steps = 25000
    c.train.batch_size = 32
    c.train.grad_accum = 4
    c.train.eval_every = 200
    c.train.checkpoint_every = 1000
    c.train.max_duration_s = 3 * 3600.0
    return c
