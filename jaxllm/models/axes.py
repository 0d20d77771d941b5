"""The logical name of every parameter dimension, for sharding (the rules to mesh axes: jaxllm/sharding.py).

Names: `vocab` (token ids), `embed` (the model width), `heads` / `kv_heads` (query or key/value heads times
the head size, flattened heads-major as the q/k/v/o kernels store them, so a split keeps whole heads),
`mlp` (MLP hidden units), `experts` (the leading axis of stacked MoE kernels), `norm` (norm scales),
None (never split). Parameters are found by their module and parameter names, for llama and gpt2 alike;
an unknown parameter is an error, so a new layer cannot silently stay unsharded.

LoRA params {"base", "lora"}: the base as above, quantized base kernels (QLoRA: codes and scales, see
models/quant.py) and the adapters replicated (they are small; a quantized base over fsdp saves nothing).
"""

from __future__ import annotations

from typing import Any

import jax

# (module name, parameter name) -> logical names of a 2-D (or 1-D) parameter's dimensions.
PARAM_AXES: dict[tuple[str, str], tuple[str | None, ...]] = {
    ("embed", "embedding"): ("vocab", "embed"),
    ("pos_embed", "embedding"): (None, "embed"),  # gpt2's learned positions
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("q", "kernel"): ("embed", "heads"),
    ("k", "kernel"): ("embed", "kv_heads"),
    ("v", "kernel"): ("embed", "kv_heads"),
    ("o", "kernel"): ("heads", "embed"),
    ("w1", "kernel"): ("embed", "mlp"),  # gate
    ("w3", "kernel"): ("embed", "mlp"),  # up
    ("w2", "kernel"): ("mlp", "embed"),  # down
    ("fc", "kernel"): ("embed", "mlp"),  # gpt2
    ("proj", "kernel"): ("mlp", "embed"),
    ("router", "kernel"): ("embed", None),  # MoE router [D, E]
}


def _leaf_axes(path: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
    if path[-1] == "scale":
        return ("norm",) * ndim
    names = PARAM_AXES.get(tuple(path[-2:]))
    if names is None:
        raise ValueError(f"parameter {'/'.join(path)} has no logical axes; add it to jaxllm/models/axes.py")
    if ndim == len(names) + 1:  # stacked experts [E, ...]
        return ("experts", *names)
    if ndim != len(names):
        raise ValueError(f"parameter {'/'.join(path)} has {ndim} dimensions, {len(names)} expected")
    return names


def _names(path) -> tuple[str, ...]:
    return tuple(str(getattr(key, "key", key)) for key in path)


def logical_axes(params: Any) -> Any:
    """A tree like `params` (arrays or ShapeDtypeStructs) with a tuple of logical names at every leaf."""
    def axes(path, leaf):
        names = _names(path)
        if names and names[0] == "lora":
            return (None,) * leaf.ndim
        if names and names[0] == "base":
            names = names[1:]
            if len(names) > 1 and names[-2] == "kernel":  # a quantized kernel's codes and scales (QLoRA)
                return (None,) * leaf.ndim
        return _leaf_axes(names, leaf.ndim)

    return jax.tree_util.tree_map_with_path(axes, params)
