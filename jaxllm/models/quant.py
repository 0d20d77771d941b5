"""Frozen base weights stored in 4-bit NormalFloat (NF4, the QLoRA paper's format) or block-wise int8.

A quantized weight is a plain dict of arrays that describes itself (no static fields), so orbax saves and
restores it like any other subtree (also without a target tree: `checkpoint.restore_params`), `jax.jit`
carries it, and the weight's shape is read from its arrays:

- NF4 (`quantize(w, "nf4")`, as bitsandbytes' `quantize_4bit(quant_type="nf4", blocksize=64,
  compress_statistics=True)`): the weight is flattened row-major and cut into blocks of 64; each block is
  divided by its absolute maximum and every value replaced by the index of the nearest of the 16 NF4 levels
  (`NF4_LEVELS`), two indices per byte, the first in the high nibble:
  {"nf4": uint8 [*shape[:-1], shape[-1] / 2], "absmax_code": uint8 [nb], "absmax_scale": float32 [nb2],
  "absmax_mean": float32 []}. The nb = ceil(n / 64) float32 block maxima are themselves quantized ("double
  quantization", 32 -> 8 bits per block): their mean is subtracted, and the rest is quantized in blocks of
  256 to bitsandbytes' signed 8-bit dynamic code (`DYNAMIC_MAP`: a sign, a decimal exponent and a linear
  fraction, so small and large maxima keep their relative precision) with one float32 absmax per block of
  256. Cost: 4 + 8/64 + 32/(64*256) = 4.127 bits per weight. The last axis must be even (every projection
  of a real model is); a last block shorter than 64 is quantized on its own maximum, like bitsandbytes'.
- int8 (`quantize(w, "int8")`): the same flattened blocks of 64, each scaled by its absmax to round(w * 127
  / absmax) in int8 (symmetric, no zero point): {"int8": int8 [*shape], "absmax": float32 [nb]}, 8.5 bits
  per weight. 64 rather than bitsandbytes' row-wise LLM.int8 scales: an outlier then costs the precision
  of 64 weights, not a whole row, and the block layout is NF4's (one code path for both).

`dequantize(q, dtype)` gives the weight back in `dtype` (computed in float32, then cast, as bitsandbytes
does). `linear(x, q)` is x @ dequantize(q) with a hand-written backward that keeps only `q` as its residual:
the dequantized matrix lives one layer at a time, in the forward and again in the backward, never the whole
model (models/lora.py uses it for every quantized Dense).

Where the NF4 levels come from (QLoRA, Dettmers et al. 2023, section 3 and appendix E): quantiles of the
standard normal, so each level carries the same probability mass of normally distributed weights, with an
exact zero. With offset delta = 0.9677083 (= (1 - 1/(2*15) + 1 - 1/(2*16)) / 2, the mean of the two ways of
keeping the outermost quantile finite), the 8 positive levels are Phi^-1 of linspace(delta, 0.5, 9)[:-1],
the 7 negative ones -Phi^-1 of linspace(delta, 0.5, 8)[:-1], plus 0; all 16 divided by the largest.
`NF4_LEVELS` is bitsandbytes' float32 table of those numbers (`get_4bit_type("nf4")`, its
`create_normal_map(0.9677083)`); tests/test_qlora.py rebuilds it from the inverse normal CDF.

A library instead? qwix 0.1.8 (Google's JAX quantization library) has NF4 and LoRA for Flax. Measured here
on a random [256, 512] kernel: its NF4 levels are these 16 numbers and, with tiles of 64 along the input
axis, its codes, scales and dequantized weights equal bitsandbytes' (no double quantization) on the
transposed, torch-layout weight exactly (max difference 0.0). But it has no double quantization (a float32
scale per 64 weights: 4.5 bits, not 4.127), stores codes as jnp.uint4, and its quantized matmuls and LoRA work
by intercepting `jax.lax.dot_general`, `jnp.einsum`, `jnp.dot` and `Module.param` while the model runs:
jaxllm's Dense calls `primitives.linear`, a custom VJP, so qwix would swap the dot inside its forward while
the hand-written backward stayed ours and never saw the adapters (no gradient reaches them); using qwix
would mean giving up those CPU backward passes. The format is ~100 lines, so jaxllm keeps its own, tested
against bitsandbytes' CPU path (tests/test_qlora.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxllm.models import primitives

KINDS = ("nf4", "int8")
BLOCK = 64  # weights per absmax block (NF4 and int8)
STAT_BLOCK = 256  # NF4 block maxima per float32 scale in the double quantization

# bitsandbytes' NF4 table (functional.get_4bit_type("nf4")): see the module docstring for its derivation.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


def _dynamic_map() -> tuple[float, ...]:
    """bitsandbytes' signed 8-bit dynamic code (`functional.create_dynamic_map()`), 256 sorted values.

    Exponent e = 0..6 gives 2^e fraction steps between 0.1 and 1 times 10^(e - 6), both signs; then 0 and 1,
    and zeros to fill 256. Computed here in float64 and rounded once to float32, so a few entries differ from
    bitsandbytes' (which rounds torch.linspace's float32 steps) by one float32 ulp.
    """
    data = []
    for e in range(7):
        n = 2 ** e + 1
        bounds = [0.1 + 0.9 * i / (n - 1) for i in range(n)]
        means = [(lo + hi) / 2 for lo, hi in zip(bounds[:-1], bounds[1:])]
        data += [10.0 ** (e - 6) * m for m in means] + [-(10.0 ** (e - 6)) * m for m in means]
    data += [0.0, 1.0]
    return tuple(sorted(data + [0.0] * (256 - len(data))))


DYNAMIC_MAP = _dynamic_map()


def kind_of(q) -> str | None:
    """"nf4" or "int8" for a quantized weight, None for anything else (an array, another subtree)."""
    if isinstance(q, dict):
        for kind in KINDS:
            if kind in q:
                return kind
    return None


def shape_of(q) -> tuple[int, ...]:
    """The shape of the weight `q` stands for."""
    if kind_of(q) == "nf4":
        *lead, half = q["nf4"].shape
        return (*lead, 2 * half)
    return tuple(q["int8"].shape)


def _blocks(flat_N: jax.Array, block: int) -> jax.Array:
    """flat [N] float32 -> [ceil(N / block), block], the last block zero-padded (zeros never raise an absmax)."""
    n_blocks = -(-flat_N.shape[0] // block)
    return jnp.pad(flat_N, (0, n_blocks * block - flat_N.shape[0])).reshape(n_blocks, block)


def _nearest(scaled: jax.Array, levels: tuple[float, ...]) -> jax.Array:
    """uint8 index of the nearest of the sorted `levels` for every value of `scaled` (in [-1, 1]).

    As bitsandbytes' `torch.bucketize(x, midpoints)`: index i when midpoint[i-1] < x <= midpoint[i], so an
    exact tie goes to the lower level."""
    table = jnp.asarray(levels, jnp.float32)
    midpoints = (table[:-1] + table[1:]) / 2
    return jnp.searchsorted(midpoints, scaled, side="left").astype(jnp.uint8)


def _absmax_scaled(blocks_BxK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(absmax [B], blocks / absmax clipped to [-1, 1]) in float32; an all-zero block stays zero."""
    absmax_B = jnp.max(jnp.abs(blocks_BxK), axis=-1)
    # x * (1 / absmax), not x / absmax: bitsandbytes' rounding, so the codes agree exactly.
    scaled = jnp.clip(blocks_BxK * (1.0 / jnp.maximum(absmax_B, 1e-38))[:, None], -1.0, 1.0)
    return absmax_B, scaled


def quantize(w: jax.Array, kind: str) -> dict[str, jax.Array]:
    """The quantized form of weight `w` (any float dtype, read as float32), `kind` "nf4" or "int8"."""
    flat_N = jnp.asarray(w, jnp.float32).reshape(-1)
    n = flat_N.shape[0]
    absmax_B, scaled_BxK = _absmax_scaled(_blocks(flat_N, BLOCK))
    if kind == "int8":
        codes = jnp.round(scaled_BxK * 127.0).astype(jnp.int8).reshape(-1)[:n]
        return {"int8": codes.reshape(w.shape), "absmax": absmax_B}
    if kind != "nf4":
        raise ValueError(f"quantization kind is '{kind}'; choose one of {', '.join(KINDS)}")
    if not w.shape or w.shape[-1] % 2:
        raise ValueError(f"NF4 packs two codes per byte along the last axis, which must be even; got shape {w.shape}")
    idx_N = _nearest(scaled_BxK.reshape(-1)[:n], NF4_LEVELS)
    packed = (idx_N[0::2] << 4) | idx_N[1::2]
    # Double quantization of the block maxima (bitsandbytes' compress_statistics).
    mean = jnp.mean(absmax_B)
    stat_scale_S, stat_scaled = _absmax_scaled(_blocks(absmax_B - mean, STAT_BLOCK))
    stat_codes = _nearest(stat_scaled.reshape(-1)[:absmax_B.shape[0]], DYNAMIC_MAP)
    return {"nf4": packed.reshape(*w.shape[:-1], w.shape[-1] // 2), "absmax_code": stat_codes,
            "absmax_scale": stat_scale_S, "absmax_mean": mean}


def block_absmax(q: dict[str, jax.Array]) -> jax.Array:
    """The float32 absmax of every block of 64 as dequantization uses it (NF4: after double quantization)."""
    if kind_of(q) == "int8":
        return q["absmax"]
    n_blocks = q["absmax_code"].shape[0]
    values = jnp.asarray(DYNAMIC_MAP, jnp.float32)[q["absmax_code"]]
    scales = jnp.repeat(q["absmax_scale"], STAT_BLOCK)[:n_blocks]
    return values * scales + q["absmax_mean"]


def dequantize(q: dict[str, jax.Array], dtype=jnp.float32) -> jax.Array:
    """The weight `q` stands for, in `dtype`: level (or int8 / 127) times its block's absmax in float32."""
    shape = shape_of(q)
    n = math.prod(shape)
    if kind_of(q) == "nf4":
        packed = q["nf4"].reshape(-1)
        idx_N = jnp.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)
        values_N = jnp.asarray(NF4_LEVELS, jnp.float32)[idx_N]
    else:
        values_N = q["int8"].reshape(-1).astype(jnp.float32) / 127.0
    scaled_BxK = _blocks(values_N, BLOCK) * block_absmax(q)[:, None]
    return scaled_BxK.reshape(-1)[:n].reshape(shape).astype(dtype)


def nbytes(q) -> int:
    """Bytes held by a quantized weight's arrays."""
    return int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(q)))


# --- the matmul over a quantized weight ------------------------------------------------------------------


def _matmul_f32(a: jax.Array, b: jax.Array) -> jax.Array:
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _after(q: dict[str, jax.Array], x: jax.Array) -> dict[str, jax.Array]:
    """`q` with its (small) float32 scale arrays made to depend on `x` (+ 0 * one element of x): the matrix
    dequantized from it cannot be computed before x exists. XLA may drop an optimization barrier (XLA:CPU
    does) and then hoists every layer's dequantization to the start of the step, keeping the whole model
    dequantized in memory; a data dependency holds on every backend. (0 * x is not folded away for floats.)"""
    zero = x.reshape(-1)[0].astype(jnp.float32) * 0.0
    return {name: a + zero if jnp.issubdtype(a.dtype, jnp.floating) else a for name, a in q.items()}


@jax.custom_vjp
def linear(x_NxI: jax.Array, q: dict[str, jax.Array]) -> jax.Array:
    """x @ dequantize(q) in x's dtype (the compute dtype), accumulated in float32: [N, O].

    No gradient for `q` (a frozen base; integer codes have none). The dequantization waits for `x` (and in
    the backward pass for the incoming gradient): `_after` makes it depend on them, so XLA cannot hoist every
    layer's dequantization to the start of the step (tests/test_qlora.py checks the compiled step's memory).
    """
    x_NxI, q = jax.lax.optimization_barrier((x_NxI, q))
    return _matmul_f32(x_NxI, dequantize(_after(q, x_NxI), x_NxI.dtype)).astype(x_NxI.dtype)


def _linear_fwd(x_NxI, q):
    # The residuals: q (already in memory as a parameter) and x's dtype as an empty array, not x itself.
    return linear(x_NxI, q), (q, jnp.zeros((0,), x_NxI.dtype))


def _linear_bwd(residuals, g_NxO):
    """d x = g @ dequantize(q)^T, the matrix dequantized again here (after g exists, same barrier)."""
    q, dtype_probe = residuals
    g_NxO, q = jax.lax.optimization_barrier((g_NxO.astype(dtype_probe.dtype), q))
    kernel_OxI = primitives.transposed(dequantize(_after(q, g_NxO), dtype_probe.dtype))
    return _matmul_f32(g_NxO, kernel_OxI).astype(dtype_probe.dtype), None


linear.defvjp(_linear_fwd, _linear_bwd)
