"""LoRA and QLoRA: low-rank adapters on the llama's linear layers, the base weights frozen (optionally stored
quantized), merged on export.

The adapters are a separate parameter subtree: training params are {"base": <the model's tree>, "lora":
{<path of a target Dense>: {"a": [D_in, r], "b": [r, D_out]}}}, e.g. lora["blocks_0/attn/q"]. The
model itself is not changed: a Flax method interceptor adds, to the output of every targeted Dense,

    dropout(x) @ a @ b * scale,    scale = alpha / r   (rsLoRA, `rslora=True`: alpha / sqrt(r))

(a ~ N(0, 1/D_in) like the paper's Kaiming init, b = 0, so a fresh adapter leaves the model exactly as it
was). rsLoRA (Kalajievski 2023) keeps the adapter's output scale independent of r, so larger ranks learn
instead of being damped by 1/r. Targets name llama's projections: q, k, v, o (attention) and gate, up, down
(SwiGLU's w1, w3, w2). The documented starting point is Unsloth's: r=16, alpha=16, dropout 0, all seven.
In a mixture-of-experts layer gate, up and down are stacked expert kernels [E, D_in, D_out]: each expert
gets its own adapter, a [E, D_in, r] and b [E, r, D_out], added to the kernel itself (W_e + a_e @ b_e *
scale, the same product as on the input) because the experts' inputs are sorted or dispatched inside
the layer; those adapters take no input dropout (config validation refuses lora.dropout > 0 for them).

QLoRA (`quantize="nf4"` or "int8", models/quant.py): the seven projection kernels of every block (targeted
or not) are stored quantized in params["base"] ({"nf4": codes, ...} in place of the kernel array). The
interceptor does not call such a Dense: it computes `quant.linear(x, q)`, which dequantizes that one kernel
to the compute dtype right there (and again in the backward pass) and names the output like Dense does
(`layers.LINEAR_OUTPUT`, so remat="dots" works as before); the whole model is never dequantized at once.
Adapters and norms stay float32. The embedding and the LM head stay unquantized float32, as in the QLoRA
paper and bitsandbytes (which skip them): the embedding is a gather whose rows enter the float32 residual
stream and, tied, also the LM head, whose logits are the loss's input; both keep exactly the model's
precision (what they cost: Llama-3.2-1B's tied table is 263M of its 1.24B parameters). Quantized
mixture-of-experts kernels are not supported (config validation refuses them): the experts' stacked
weights are consumed inside the layer's dispatch, not by a Dense, so they would be dequantized whole.
`init="loftq"` (`loftq_init`, LoftQ: Li et al. 2023) starts the adapters from the quantization error
instead of zero: T times, Q = quant(W - a @ b * scale), then a, b from the rank-r SVD of W - deq(Q), so
deq(Q) + a @ b * scale starts closer to W than deq(quant(W)) does.

`LoraModel` has the `init` / `apply` signature of a Linen module, so the train and eval steps use it
unchanged; the base params go through `stop_gradient`, the train step differentiates only params["lora"]
(jaxllm/step.py) and `frozen_base_optimizer` gives the base `optax.set_to_zero()` (no optimizer state).
`merge` folds the adapters into float32 kernels (dequantized first): W + a @ b * scale, which gives the
same logits as the adapted model.
"""

from __future__ import annotations

import functools
import math
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.ad_checkpoint import checkpoint_name

from jaxllm.models import layers
from jaxllm.models import quant

# LoRA target name -> the Dense module name in jaxllm/models/llama.py and layers.py.
TARGET_MODULES = {"q": "q", "k": "k", "v": "v", "o": "o", "gate": "w1", "up": "w3", "down": "w2"}
QUANTIZED_MODULES = tuple(TARGET_MODULES.values())  # QLoRA stores all seven projections quantized
LOFTQ_ITERS = 1  # PEFT's LoftQConfig default; the LoftQ paper reports most of the gain from the first pass


def target_names(targets: str) -> tuple[str, ...]:
    """Dense module names of a comma-separated target list such as "q,v,gate"."""
    return tuple(TARGET_MODULES[t.strip()] for t in targets.split(",") if t.strip())


def adapter_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """The adapters' output scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _kernels(params, modules: tuple[str, ...]) -> dict:
    """{"blocks_0/attn/q": kernel} for every Dense kernel of `modules` in a param tree: an array [D_in, D_out]
    (or [E, D_in, D_out]), or a quantized weight (models/quant.py)."""
    found = {}

    def walk(tree, names):
        for key, sub in tree.items():
            if key == "kernel" and names and names[-1] in modules:
                found["/".join(names)] = sub
            elif isinstance(sub, dict) and quant.kind_of(sub) is None:
                walk(sub, names + [key])

    walk(params, [])
    return found


def _replace_kernels(params, new: dict):
    """`params` with the kernels named in `new` ({"blocks_0/attn/q": value}) replaced."""

    def walk(tree, names):
        out = {}
        for key, sub in tree.items():
            name = "/".join(names)
            if key == "kernel" and name in new:
                out[key] = new[name]
            elif isinstance(sub, dict) and quant.kind_of(sub) is None:
                out[key] = walk(sub, names + [key])
            else:
                out[key] = sub
        return out

    return walk(params, [])


def _shape(kernel) -> tuple[int, ...]:
    return quant.shape_of(kernel) if quant.kind_of(kernel) else tuple(kernel.shape)


_quantize = jax.jit(quant.quantize, static_argnums=1)


def quantize_base(params, kind: str):
    """Base params with the seven projection kernels of every (dense) block quantized to `kind`;
    "none": unchanged. Everything else (embedding, norms, LM head) as it was."""
    if kind == "none":
        return params
    kernels = _kernels(params, QUANTIZED_MODULES)
    return _replace_kernels(params, {name: _quantize(k, kind) for name, k in kernels.items()
                                     if not quant.kind_of(k) and k.ndim == 2})


@functools.partial(jax.jit, static_argnums=1)
def _rank_r(residual_IxO: jax.Array, r: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """(a [I, r], b [r, O]) with a @ b * scale the best rank-r approximation of `residual` (its SVD)."""
    u, s, vt = jnp.linalg.svd(residual_IxO, full_matrices=False)
    root = jnp.sqrt(s[:r])
    return u[:, :r] * root, root[:, None] * vt[:r] / scale


def loftq_init(kernel_IxO: jax.Array, kind: str, rank: int, scale: float, iters: int = LOFTQ_ITERS):
    """LoftQ: (quantized kernel, a [I, r], b [r, O]) after `iters` alternations of Q = quant(W - a @ b * scale)
    and (a, b) = the rank-r SVD of W - deq(Q), from a = b = 0. All float32."""
    w = jnp.asarray(kernel_IxO, jnp.float32)
    a = jnp.zeros((w.shape[0], rank), jnp.float32)
    b = jnp.zeros((rank, w.shape[1]), jnp.float32)
    q = None
    for _ in range(max(int(iters), 1)):
        q = _quantize(w - a @ b * scale, kind)
        a, b = _rank_r(w - quant.dequantize(q, jnp.float32), rank, scale)
    return q, a, b


class LoraModel:
    """A Linen model with LoRA adapters: `init` and `apply` as the wrapped module's, params {"base", "lora"}."""

    def __init__(self, base: nn.Module, *, rank: int, alpha: float, dropout: float, targets: str,
                 rslora: bool = False, quantize: str = "none"):
        self.base, self.rank, self.alpha, self.dropout = base, rank, alpha, dropout
        self.modules = target_names(targets)
        self.scale = adapter_scale(alpha, rank, rslora)
        self.quantize = quantize

    def init_adapters(self, key: jax.Array, base_params) -> dict:
        """Fresh adapters for `base_params`: a ~ N(0, 1/D_in) [D_in, r], b = 0 [r, D_out], float32 (with a
        leading expert axis E for stacked expert kernels)."""
        adapters = {}
        for i, (name, kernel) in enumerate(sorted(_kernels(base_params, self.modules).items())):
            *experts, d_in, d_out = _shape(kernel)
            a = jax.random.normal(jax.random.fold_in(key, i), (*experts, d_in, self.rank), jnp.float32) / jnp.sqrt(d_in)
            adapters[name] = {"a": a, "b": jnp.zeros((*experts, self.rank, d_out), jnp.float32)}
        return adapters

    def adapt(self, key: jax.Array, base_params, init: str = "default", loftq_iters: int = LOFTQ_ITERS) -> dict:
        """Training params for float `base_params`: {"base": quantized as configured, "lora": adapters}.

        init "default": fresh adapters (`init_adapters`); "loftq" (with quantization): `loftq_init` for every
        targeted kernel, its adapters fitted to its quantization error."""
        if init != "loftq":
            return {"base": quantize_base(base_params, self.quantize), "lora": self.init_adapters(key, base_params)}
        if self.quantize == "none":
            raise ValueError("LoftQ init fits the adapters to the quantization error; it needs quantize nf4 or int8")
        targeted, adapters = {}, {}
        for name, kernel in sorted(_kernels(base_params, self.modules).items()):
            targeted[name], a, b = loftq_init(kernel, self.quantize, self.rank, self.scale, loftq_iters)
            adapters[name] = {"a": a, "b": b}
        return {"base": quantize_base(_replace_kernels(base_params, targeted), self.quantize), "lora": adapters}

    def init(self, key: jax.Array, tokens_BxL: jax.Array) -> dict:
        base = self.base.init(key, tokens_BxL)["params"]
        return {"params": self.adapt(jax.random.fold_in(key, 1), base)}

    def apply(self, variables, tokens_BxL: jax.Array, deterministic: bool = True, rngs=None, **kwargs) -> jax.Array:
        """Logits float32 [B, L, V] of the adapted model; base params get no gradient.

        Other keyword arguments (`return_hidden`, `mutable`) go to the wrapped module's apply."""
        params = variables["params"]
        base, adapters = jax.lax.stop_gradient(params["base"]), params["lora"]
        quantized = {name: k for name, k in _kernels(base, QUANTIZED_MODULES).items() if quant.kind_of(k)}
        dropout_key = None if deterministic or not self.dropout or rngs is None else rngs["dropout"]

        def interceptor(next_fun, args, kwargs, context):
            name = "/".join(context.module.path)
            if context.method_name != "__call__" or (name not in adapters and name not in quantized):
                return next_fun(*args, **kwargs)
            if name in quantized:  # the Dense's own computation, over its kernel dequantized on the fly
                x = args[0]
                x_NxI = x.astype(context.module.dtype).reshape(-1, x.shape[-1])
                y_NxO = checkpoint_name(quant.linear(x_NxI, quantized[name]), layers.LINEAR_OUTPUT)
                out = y_NxO.reshape(*x.shape[:-1], y_NxO.shape[-1])
            else:
                out = next_fun(*args, **kwargs)
            if name not in adapters:
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


def wrap(base: nn.Module, lora_cfg) -> LoraModel:
    """`base` with adapters as the `finetune.lora` config section (or a dict like it) describes: rank, alpha,
    dropout, targets, rslora and quantize (absent in configs saved before them: off)."""
    return LoraModel(base, rank=lora_cfg["rank"], alpha=lora_cfg["alpha"], dropout=lora_cfg["dropout"],
                     targets=lora_cfg["targets"], rslora=bool(lora_cfg.get("rslora", False)),
                     quantize=lora_cfg.get("quantize", "none"))


def is_lora(params) -> bool:
    return isinstance(params, dict) and set(params) == {"base", "lora"}


def merge(params, lora_cfg):
    """The model's float32 params with every adapter folded in: W + a @ b * scale, W dequantized first when
    the base is quantized; plain params pass through. `lora_cfg`: the `finetune.lora` section (or a dict)
    whose alpha and rslora (absent: False) give the scale; r is the adapters' own."""
    if not is_lora(params):
        return params
    adapters = params["lora"]
    alpha, rslora = float(lora_cfg["alpha"]), bool(lora_cfg.get("rslora", False))
    folded = {}
    for name, kernel in _kernels(params["base"], QUANTIZED_MODULES + tuple(n.split("/")[-1] for n in adapters)).items():
        w = quant.dequantize(kernel, jnp.float32) if quant.kind_of(kernel) else jnp.asarray(kernel, jnp.float32)
        if name in adapters:
            a, b = adapters[name]["a"], adapters[name]["b"]
            w = w + a @ b * adapter_scale(alpha, a.shape[-1], rslora)
        folded[name] = w
    return jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float32), _replace_kernels(params["base"], folded))


def frozen_base_optimizer(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optimizer` on the "lora" subtree and `set_to_zero` (no state, no update) on the "base" subtree."""
    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()},
                                 lambda params: {"base": jax.tree.map(lambda _: "frozen", params["base"]),
                                                 "lora": jax.tree.map(lambda _: "train", params["lora"])})


def tree_bytes(tree) -> int:
    """Bytes held by the arrays of a pytree (what an optimizer state costs in memory)."""
    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree) if hasattr(leaf, "dtype")))
