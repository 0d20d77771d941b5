"""The reference llama2 model at baseline size: 12L/768/12h, RMSNorm, RoPE, SwiGLU (123.6M params).

Everything else as configs/baseline.py. `python -m jaxllm.train --config configs/llama.py`
"""

import baseline


def get_config():
    c = baseline.get_config()
    c.model.name = "llama"
    return c
