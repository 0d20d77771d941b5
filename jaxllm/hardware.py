"""What the hardware can do and what a run uses of it: peak FLOP/s, model FLOPs utilisation, peak memory.

MFU = achieved model FLOP/s / peak FLOP/s, with achieved = tokens_per_s * models.flops_per_token. On a
known accelerator the peak is the vendor's dense (no sparsity) figure for the precision the run's matmuls
use (`PEAK_FLOPS`): bf16 (also float16) for `model.dtype=bfloat16`; for a float32 run, TF32, because XLA's
GPU default precision lets float32 dots run on TF32 tensor cores, unless `jax_default_matmul_precision` is
`highest`/`float32` (true float32 on CUDA cores: the float32 figure) or `bfloat16`. On a CPU there is no
honest datasheet number, so the peak is a square matmul measured on this machine in the compute dtype (bf16
inputs with float32 accumulation, or float32), and CPU MFU reads "fraction of what this CPU's matmul
reaches". The measurement is cached per (platform, dtype) for the life of the process.
"""

from __future__ import annotations

import resource
import sys
import time

import jax
import jax.numpy as jnp

# Dense peak FLOP/s by device kind (substring of jax's `device_kind`, lower case) and matmul precision, from
# NVIDIA's datasheets (SXM parts; their tensor-core figures halved where quoted with sparsity).
PEAK_FLOPS = {
    "h200": {"bfloat16": 989e12, "tf32": 494.5e12, "float32": 67e12},
    "h100": {"bfloat16": 989e12, "tf32": 494.5e12, "float32": 67e12},
    "a100": {"bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12},
}

_MEASURED: dict[tuple[str, str], float] = {}


def device_description() -> str:
    """`platform:device_kind x count` of the default backend, e.g. `cpu:cpu x4` or `gpu:NVIDIA H100 x1`."""
    devices = jax.devices()
    return f"{devices[0].platform}:{devices[0].device_kind} x{len(devices)}"


def measure_matmul_flops(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a jitted [size, size] @ [size, size] matmul in `dtype` with float32 accumulation."""
    key = (jax.default_backend(), str(dtype))
    if key in _MEASURED:
        return _MEASURED[key]
    a_NxN = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
    b_NxN = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dtype)
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    matmul(a_NxN, b_NxN).block_until_ready()  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a_NxN, b_NxN).block_until_ready()
        best = min(best, time.perf_counter() - start)
    _MEASURED[key] = 2.0 * size**3 / best
    return _MEASURED[key]


def matmul_precision(dtype: str) -> str:
    """The `PEAK_FLOPS` column of a run whose compute dtype is `dtype` (see the module docstring)."""
    if str(dtype) in ("bfloat16", "float16"):
        return "bfloat16"
    setting = str(jax.config.jax_default_matmul_precision or "default").lower()
    if setting in ("highest", "float32"):
        return "float32"
    return "bfloat16" if setting == "bfloat16" else "tf32"


def peak_flops(dtype: str = "bfloat16", n_devices: int = 1) -> tuple[float, str]:
    """(peak FLOP/s of the `n_devices` a run uses, where the figure comes from).

    Known accelerators: the table's per-device figure for `dtype`'s matmul precision times n_devices. CPU (or
    unknown): a matmul measured now in `dtype` (cached); simulated CPU devices share the same cores, so the
    figure is not multiplied.
    """
    kind = jax.devices()[0].device_kind.lower()
    for name, flops in PEAK_FLOPS.items():
        if name in kind:
            precision = matmul_precision(dtype)
            return flops[precision] * n_devices, f"table:{name}-{precision}"
    return measure_matmul_flops(dtype), f"measured:matmul-{dtype}"


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation: tokens_per_s * flops_per_token / peak FLOP/s (NaN when either is unknown)."""
    if not peak or not flops_per_token:
        return float("nan")
    return tokens_per_s * flops_per_token / peak


def peak_memory_mb() -> float:
    """Peak memory of this run in MiB: the device's peak bytes in use on an accelerator (when jax reports
    it), else the host process's peak resident set size."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return stats["peak_bytes_in_use"] / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
