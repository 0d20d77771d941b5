"""The same model and train step in PyTorch, for a back-to-back comparison with scripts/bench.py.

`python scripts/bench_torch.py [--steps N] [--warmup W] [--variants eager-f32,compile-bf16,...]`
(needs the `[bench]` extra: `pip install -e ".[bench]"`, torch 2.13).

Model (configs/bench_cpu.py's): llama 4L, d=256, 4 heads, SwiGLU hidden 768, RMSNorm in float32 (eps 1e-5),
RoPE theta 10000 on adjacent pairs, tied embeddings, no biases, vocab 50304, seq 256, batch 8, init
N(0, 0.02) with residual projections 0.02/sqrt(2n). Step: token-mean cross-entropy, backward, clip the
global norm at 1.0, AdamW (lr 1e-3, betas 0.9/0.95, eps 1e-8, weight decay 0.1 on linear weights only).
Attention is PyTorch's fused `scaled_dot_product_attention(is_causal=True)`, as llm-baselines uses.

Variants `<mode>-<dtype>`, dtype `f32` or `bf16` (bf16 autocast; float32 params and optimizer, as the
reference trained), mode:
  eager         plain PyTorch;
  compile       `torch.compile(model)`: forward and its backward compiled (AOTAutograd), then
                clipping and AdamW run eagerly (llm-baselines' setting);
  compile-step  the whole step compiled as one function, as jax.jit compiles jaxllm's: `torch.compile` of a
                `train_step(tokens, targets)` that runs the forward, `loss.backward()`, clipping,
                `optimizer.step()` and `zero_grad`. Compiled autograd (`torch._dynamo.config.compiled_autograd`)
                lets dynamo capture the backward inside the function, and dynamo traces the AdamW update
                (foreach=False, fused=False: inductor writes its own fused kernels; `capturable` is for CUDA
                graphs and not needed on CPU). What dynamo cannot trace it runs eagerly between compiled
                graphs (graph breaks), so the step is one Python call, not necessarily one graph.
Each prints one JSON line with the keys of scripts/bench.py plus `variant` and `loss` (the last timed step's);
every variant sees the same initial weights and batches, so their losses agree up to bf16 noise. MFU is against
a torch matmul measured in the same run in the variant's dtype (float32 or bf16).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a checkout
from jaxllm import hugepages  # noqa: E402  (standard library only; the same allocator setting as bench.py)

V, L, D, H, N_LAYER, B = 50304, 256, 256, 4, 4, 8
HIDDEN = 256 * ((int(2 * 4 * D / 3) + 255) // 256)  # the SwiGLU rule: 768 at d=256


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).type_as(x)


def rope(x, cos, sin):
    """x [B, H, L, K]: rotate adjacent pairs (2i, 2i+1) in float32."""
    x32 = x.float().unflatten(-1, (-1, 2))
    x0, x1 = x32[..., 0], x32[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2).type_as(x)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(D), RMSNorm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.w1, self.w3 = nn.Linear(D, HIDDEN, bias=False), nn.Linear(D, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, D, bias=False)

    def forward(self, x, cos, sin):
        b, l, _ = x.shape
        h = self.attn_norm(x)
        q, k, v = (proj(h).view(b, l, H, D // H).transpose(1, 2) for proj in (self.q, self.k, self.v))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, l, D))
        h = self.mlp_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Llama(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.norm_f = RMSNorm(D)
        inv_freq = 10000.0 ** (-torch.arange(0, D // H, 2, dtype=torch.float32) / (D // H))
        angles = torch.arange(L, dtype=torch.float32)[:, None] * inv_freq[None]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * N_LAYER) if name.endswith(("o.weight", "w2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, tokens, targets):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        logits = F.linear(self.norm_f(x), self.embed.weight)  # tied head
        return F.cross_entropy(logits.float().view(-1, V), targets.reshape(-1))


def flops_per_token(model) -> float:
    """jaxllm's formula: 6 * (non-embedding params + V*D) + 6 * n_layer * L * D (causal attention halved)."""
    n_nonembed = sum(p.numel() for p in model.parameters()) - V * D
    return float(6 * (n_nonembed + V * D) + 6 * N_LAYER * L * D)


def matmul_flops(dtype, size=2048, repeats=5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2.0 * size**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


MODES = ("eager", "compile", "compile-step")


def bench(variant: str, steps: int, warmup: int) -> dict:
    mode, _, dtype = variant.rpartition("-")
    if mode not in MODES or dtype not in ("f32", "bf16"):
        raise ValueError(f"unknown variant {variant!r}: expected <{'|'.join(MODES)}>-<f32|bf16>")
    torch.manual_seed(0)
    model = Llama()
    decay = [p for p in model.parameters() if p.dim() == 2 and p is not model.embed.weight]
    no_decay = [p for p in model.parameters() if p.dim() != 2 or p is model.embed.weight]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=False,
                                  foreach=False if mode == "compile-step" else None)
    loss_fn = torch.compile(model) if mode == "compile" else model
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    generator = torch.Generator().manual_seed(0)

    def train_step(tokens, targets):
        with autocast:
            loss = loss_fn(tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    if mode == "compile-step":
        train_step = torch.compile(train_step)

    def step():
        rows = torch.randint(0, V, (B, L + 1), generator=generator)
        return train_step(rows[:, :-1], rows[:, 1:])

    step_s, compile_s = [], 0.0
    # Compiled autograd lets dynamo trace loss.backward() into the compiled step; only for that variant.
    with torch._dynamo.config.patch(compiled_autograd=mode == "compile-step"):
        for i in range(1 + warmup + steps):
            start = time.perf_counter()
            loss = step()
            elapsed = time.perf_counter() - start
            if i == 0:
                compile_s = elapsed
            elif i > warmup:
                step_s.append(elapsed)
    median = statistics.median(step_s)
    tokens_per_s = B * L / median
    flops = flops_per_token(model)
    peak = matmul_flops(torch.bfloat16 if dtype == "bf16" else torch.float32)
    return {
        "variant": f"torch {variant}",
        "loss": round(float(loss), 4),
        "tokens_per_s": round(tokens_per_s, 1),
        "step_ms": {"median": round(1e3 * median, 2), "min": round(1e3 * min(step_s), 2),
                    "max": round(1e3 * max(step_s), 2)},
        "compile_s": round(compile_s, 2),
        "flops_per_token": flops,
        "mfu": round(tokens_per_s * flops / peak, 4),
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, 1),
        "device": f"cpu:torch threads={torch.get_num_threads()}",
        "torch": torch.__version__,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench_torch.py", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default="eager-f32,eager-bf16,compile-f32,compile-bf16,"
                                               "compile-step-f32,compile-step-bf16")
    args = parser.parse_args(argv)
    for variant in args.variants.split(","):
        print(json.dumps(bench(variant, args.steps, args.warmup)), flush=True)
    return 0


if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()  # before anything runs: see jaxllm/hugepages.py
    sys.exit(main())
