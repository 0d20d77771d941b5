"""LoRA: low-rank adapters on the llama's linear layers, the base weights frozen, merged on export.

The adapters are a separate parameter subtree: training params are {"base": <the model's tree>, "lora":
{<path of a target Dense>: {"a": [D_in, r], "b": [r, D_out]}}}, e.g. lora["blocks_0/attn/q"]. The
model itself is not changed: a Flax method interceptor adds, to the output of every targeted Dense,

    dropout(x) @ a @ b * (alpha / r)

(a ~ N(0, 1/D_in) like the paper's Kaiming init, b = 0, so a fresh adapter leaves the model exactly as it
was). Targets name llama's projections: q, k, v, o (attention) and gate, up, down (SwiGLU's w1, w3, w2).
In a mixture-of-experts layer gate, up and down are stacked expert kernels [E, D_in, D_out]: each expert
gets its own adapter, a [E, D_in, r] and b [E, r, D_out], added to the kernel itself (W_e + a_e @ b_e *
alpha / r, the same product as on the input) because the experts' inputs are sorted or dispatched inside
the layer; those adapters take no input dropout (config validation refuses lora.dropout > 0 for them).

`LoraModel` has the `init` / `apply` signature of a Linen module, so the train and eval steps use it
unchanged; the base params go through `stop_gradient` (no backward pass into them) and `make_optimizer`
gives them `optax.set_to_zero()` (no optimizer state). `merge` folds the adapters into the kernels:
W + a @ b * alpha / r, which gives the same logits as the adapted model.
"""

from __future__ import annotations

import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

# LoRA target name -> the Dense module name in jaxllm/models/llama.py and layers.py.
TARGET_MODULES = {"q": "q", "k": "k", "v": "v", "o": "o", "gate": "w1", "up": "w3", "down": "w2"}


def target_names(targets: str) -> tuple[str, ...]:
    """Dense module names of a comma-separated target list such as "q,v,gate"."""
    return tuple(TARGET_MODULES[t.strip()] for t in targets.split(",") if t.strip())


def _kernels(params, modules: tuple[str, ...]) -> dict[str, jax.Array]:
    """{"blocks_0/attn/q": kernel [D_in, D_out]} for every targeted Dense kernel in a param tree."""
    found = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [getattr(k, "key", str(k)) for k in path]
        if len(names) >= 2 and names[-1] == "kernel" and names[-2] in modules:
            found["/".join(names[:-1])] = leaf
    return found


class LoraModel:
    """A Linen model with LoRA adapters: `init` and `apply` as the wrapped module's, params {"base", "lora"}."""

    def __init__(self, base: nn.Module, *, rank: int, alpha: float, dropout: float, targets: str):
        self.base, self.rank, self.alpha, self.dropout = base, rank, alpha, dropout
        self.modules = target_names(targets)
        self.scale = alpha / rank

    def init_adapters(self, key: jax.Array, base_params) -> dict:
        """Fresh adapters for `base_params`: a ~ N(0, 1/D_in) [D_in, r], b = 0 [r, D_out], float32 (with a
        leading expert axis E for stacked expert kernels)."""
        adapters = {}
        for i, (name, kernel) in enumerate(sorted(_kernels(base_params, self.modules).items())):
            *experts, d_in, d_out = kernel.shape
            a = jax.random.normal(jax.random.fold_in(key, i), (*experts, d_in, self.rank), jnp.float32) / jnp.sqrt(d_in)
            adapters[name] = {"a": a, "b": jnp.zeros((*experts, self.rank, d_out), jnp.float32)}
        return adapters

    def init(self, key: jax.Array, tokens_BxL: jax.Array) -> dict:
        base = self.base.init(key, tokens_BxL)["params"]
        return {"params": {"base": base, "lora": self.init_adapters(jax.random.fold_in(key, 1), base)}}

    def apply(self, variables, tokens_BxL: jax.Array, deterministic: bool = True, rngs=None, **kwargs) -> jax.Array:
        """Logits float32 [B, L, V] of the adapted model; base params get no gradient.

        Other keyword arguments (`return_hidden`, `mutable`) go to the wrapped module's apply."""
        params = variables["params"]
        base, adapters = jax.lax.stop_gradient(params["base"]), params["lora"]
        dropout_key = None if deterministic or not self.dropout or rngs is None else rngs["dropout"]

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            name = "/".join(context.module.path)
            if context.method_name != "__call__" or name not in adapters:
                return out
            if not args:  # an MoE ExpertKernel returns its weights [E, D_in, D_out]: adapt them directly
                a, b = adapters[name]["a"], adapters[name]["b"]
                return out + (a @ b * self.scale).astype(out.dtype)
            x = args[0]
            if dropout_key is not None:
                key = jax.random.fold_in(dropout_key, zlib.crc32(name.encode()))
                keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
                x = jnp.where(keep, x / (1.0 - self.dropout), 0.0).astype(x.dtype)
            a, b = adapters[name]["a"].astype(x.dtype), adapters[name]["b"].astype(x.dtype)
            return out + ((x @ a) @ b * self.scale).astype(out.dtype)

        with nn.intercept_methods(interceptor):
            return self.base.apply({"params": base}, tokens_BxL, deterministic=deterministic, rngs=rngs, **kwargs)


def is_lora(params) -> bool:
    return isinstance(params, dict) and set(params) == {"base", "lora"}


def merge(params, alpha: float):
    """Base params with every adapter folded in (W + a @ b * alpha / r); plain params pass through."""
    if not is_lora(params):
        return params
    adapters = params["lora"]

    def fold(path, leaf):
        names = [getattr(k, "key", str(k)) for k in path]
        name = "/".join(names[:-1])
        if names[-1] != "kernel" or name not in adapters:
            return leaf
        a, b = adapters[name]["a"], adapters[name]["b"]
        scale = alpha / a.shape[-1]
        return (leaf.astype(jnp.float32) + a @ b * scale).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fold, params["base"])


def frozen_base_optimizer(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optimizer` on the "lora" subtree and `set_to_zero` (no state, no update) on the "base" subtree."""
    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()},
                                 lambda params: {"base": jax.tree.map(lambda _: "frozen", params["base"]),
                                                 "lora": jax.tree.map(lambda _: "train", params["lora"])})


def tree_bytes(tree) -> int:
    """Bytes held by the arrays of a pytree (what an optimizer state costs in memory)."""
    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree) if hasattr(leaf, "dtype")))
