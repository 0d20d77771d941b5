"""The 2024 MoE team's run: llama 12L/768/12h with a mixture of 4 SwiGLU experts, top-2, in every layer.

Router softmax then top-2 without renormalisation, aux loss 1e-2 x load-balance + 1e-3 x router z-loss,
11000 steps of 32 x 4 x 512 tokens; everything else as configs/llama.py (and configs/baseline.py).
293.5M parameters, 180.2M active per token. The team's best run added label smoothing 0.1:

    python -m jaxllm.train --config configs/moe.py
    python -m jaxllm.train --config configs/moe.py --config.loss.label_smoothing=0.1
"""

import llama


def get_config():
    c = llama.get_config()
    c.moe.n_experts = 4
    c.moe.top_k = 2
    c.train.steps = 11000
    return c
