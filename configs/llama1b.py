"""Pretraining at the Llama-3.2-1B shape (configs/llama32_1b.py's model: 16 layers, d=2048, 32 heads, 8 KV heads,
SwiGLU 8192, vocab 128256, tied, seq 2048; 1,235.8M parameters), from random weights, on 8 devices.

Float32 parameters and AdamW moments (13.81 GiB of state in all), bfloat16 compute, full remat. One step is
8 sequences of 2048 tokens: one row per device on 8 devices (any mesh whose data x fsdp product divides 8).
The state is what decides the mesh: replicated (`data:8`) every device holds all of it, sharded (`fsdp:8`,
this config's default `fsdp:-1`) an eighth, 1.73 GiB. What a step needs on each device, without running one (docs/benchmarks.md, "Sharding: data vs FSDP vs
tensor parallel"; on CPU the 8 devices are simulated):
  python scripts/bench.py --config configs/llama1b.py --num_devices 8 --compile_only --config.train.mesh=data:8
  python scripts/bench.py --config configs/llama1b.py --num_devices 8 --compile_only --config.train.mesh=fsdp:8
  python scripts/bench.py --config configs/llama1b.py --num_devices 8 --compile_only --config.train.mesh=fsdp:4,tensor:2
Training it: `python -m jaxllm.train --config configs/llama1b.py --config.train.mesh=fsdp:8` (the data section
is the default synthetic corpus with the byte tokenizer; point data.* at a real corpus and tokenizer).
"""

import llama32_1b

from jaxllm.config import default_config


def get_config():
    c = default_config()
    c.model.update(llama32_1b.get_config().model.to_dict())  # the shape; bfloat16 compute, remat full
    c.model.param_dtype = "float32"
    c.data.tokenizer = "byte"
    c.stages = "pretrain"
    c.optim.lr = 3e-4  # Llama's peak learning rate at this size
    # 8 sequences per step: one per device on 8; the state sharded over every device (ZeRO-3).
    c.train.update(batch_size=8, grad_accum=1, mesh="fsdp:-1")
    return c
