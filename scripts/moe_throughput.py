"""Training throughput of a mixture-of-experts llama against the dense llama of the same width.

Times the real compiled train step (jaxllm.step, AdamW, one device) on random tokens, after one warm-up
step that includes compilation, and prints one JSON line per variant: tokens/s, parameters (total and
active) and FLOPs/token. Variants: dense, MoE capacity mode, MoE dropless mode (E experts, top-k).
Run it from the repository root (`python -m` puts this checkout first on the path).

    python -m scripts.moe_throughput                        # 4L/256/4h, vocab 320, seq 256, batch 8
    python -m scripts.moe_throughput --n_embd=512 --steps=5
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import hugepages, models, optim, sharding, step as step_lib
from jaxllm.config import default_config, validate


def make_config(args, variant: str):
    c = default_config()
    c.model.update(dict(name="llama", n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                        vocab_size=args.vocab_size, sequence_length=args.seq_len, dtype=args.dtype))
    c.train.update(dict(batch_size=args.batch_size, grad_accum=1, steps=1000, num_devices=1))
    if variant != "dense":
        c.moe.update(dict(n_experts=args.n_experts, top_k=args.top_k, mode=variant,
                          capacity_factor=args.capacity_factor, group_size=args.group_size))
    return validate(c)


def measure(config, steps: int, repeats: int) -> float:
    """Tokens per second of the compiled train step over `steps` steps after a warm-up step, the best of
    `repeats` timings (the least disturbed by other processes on a shared machine)."""
    mesh = sharding.make_mesh(1)
    model = models.build_model(config.model, config.moe)
    optimizer = optim.make_optimizer(config)
    train_step = step_lib.compile_train_step(
        step_lib.make_train_step(model, optimizer, optim.make_schedule(config), config, mesh), mesh)
    state = jax.jit(lambda: step_lib.init_state(model, optimizer, config))()
    b, l, v = config.train.batch_size, config.model.sequence_length, config.model.vocab_size
    tokens = np.random.default_rng(0).integers(0, v, size=(1, b, l + 1), dtype=np.int32)
    batch = sharding.shard_batch({"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
                                  "weights": np.ones((1, b, l), np.float32)}, mesh, batch_axis=1)
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
        best = min(best, time.perf_counter() - start)
    return steps * b * l / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=256)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=320)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--n_experts", type=int, default=4)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--capacity_factor", type=float, default=1.25)
    parser.add_argument("--group_size", type=int, default=0)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="dense,capacity,dropless")
    args = parser.parse_args()
    for variant in args.variants.split(","):
        config = make_config(args, variant)
        row = {"variant": variant, "tokens_per_s": round(measure(config, args.steps, args.repeats), 1),
               "group_size": config.moe.group_size, "capacity_factor": config.moe.capacity_factor,
               "params": models.param_count(config.model, config.moe),
               "active_params": models.active_param_count(config.model, config.moe),
               "flops_per_token": models.flops_per_token(config.model, config.moe),
               "backend": jax.default_backend(), "jax": jax.__version__}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()  # before anything runs: see jaxllm/hugepages.py
    main()
