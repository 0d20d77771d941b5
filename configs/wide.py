"""The 2024 winner: llama 10L/1024/16h (179.98M params), 64 x 4 x 512 tokens per step.

AdamW lr 1.25e-3, clipping at 1.0, one-cycle cosine over 10000 steps, 3-hour budget on SlimPajama-6B.
`python -m jaxllm.train --config configs/wide.py`
"""

import llama


def get_config():
    c = llama.get_config()
    c.model.n_layer, c.model.n_embd, c.model.n_head = 10, 1024, 16
    c.optim.lr = 1.25e-3
    c.optim.grad_clip = 1.0
    c.train.steps = 10000
    c.train.batch_size = 64
    c.train.grad_accum = 4
    return c
