"""The pure training and evaluation steps.

`train_step(state, batch) -> (state, metrics)` is compiled once: the batch holds `grad_accum`
micro-batches (`inputs_KxBxL`), the gradient is the token-mean over all of them (the same as one batch
K times bigger, up to float rounding), and the dropout key is derived from the step, so the step has no
hidden state. Parameters and optimizer state are replicated over the `data` mesh axis and the batch is
split along B over it.

Where the work happens on N > 1 devices: the whole gradient computation (all K micro-batches) runs inside
`jax.shard_map` over `data`. Each device takes its B / N rows of every micro-batch, computes local
gradient and loss sums (the fused LM head and the MoE experts see only those rows), adds them up over the
K micro-batches in the accumulation scan, and then one `psum` over `data` of (gradients, LossSums, MoE
sums) makes them global: one gradient all-reduce per optimizer step, whatever K. The optimizer update
runs after it, outside the shard_map, replicated (every device applies the same update to its copy).
Left to XLA's partitioner instead, the fused head's chunk loop and the dropless experts' sort made it
all-gather the hidden states and compute the global batch on every device, and the gradient all-reduce
sat inside the accumulation loop (K of them); scripts/bench.py --num_devices N prints the difference.
Differences from one device: each device draws its own dropout masks (the key folds in the device
index), and MoE router statistics are per device (below). One device skips the shard_map: it is the
plain computation, bit for bit as before.

On a mesh with `fsdp` or `tensor` axes (jaxllm/sharding.py) the step is one SPMD program instead: the state
arrives sharded by `state_shardings` (parameters, gradients and optimizer moments split over fsdp/tensor by
their logical axes), the batch split over `data` x `fsdp`, and the model pins its activations to that batch
split (`sharding.constrain`), so XLA all-gathers each layer's weights where they are used and
reduce-scatters their gradients (ZeRO-3), and splits heads and MLP units over `tensor`. The fused LM head
runs one chunk loop per batch shard (so no device computes another's rows). Dropout masks are the global
batch's (partitionable threefry), and MoE routing is over the global batch: the maths of one device, up to
float summation order. Its per-micro-batch gradients are reduce-scattered inside the accumulation loop
(K reduce-scatters per step, as FSDP does; XLA:CPU emits all-reduces in their place, docs/benchmarks.md).

With mixture-of-experts layers (config.moe.n_experts > 0) the model is applied with
mutable=["intermediates"] to read what the routers sow: their auxiliary loss is added to the training
objective (never to validation loss, which stays comparable with dense models), and the aux losses,
per-layer expert loads and dropped fraction are returned as "moe/..." metrics. On N devices the router
statistics (load-balance loss, z-loss, loads, dropped fraction) are computed over each device's rows and
averaged with the rows' token weights: per-device load balancing, as in GShard/Switch data-parallel
training. The load-balance loss is not linear in the tokens, so the aux loss (and through its gradient
the update) differs slightly from one device's on the same global batch; the NLL does not.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from jaxllm import loss as loss_lib
from jaxllm import models
from jaxllm import sharding
from jaxllm.models import axes as axes_lib
from jaxllm.models import lora as lora_lib
from jaxllm.models import moe as moe_lib

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (what a checkpoint holds)."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any


def init_state(model: nn.Module, optimizer: optax.GradientTransformation, config) -> TrainState:
    """Fresh parameters (from `config.seed`) and optimizer state."""
    tokens_1xL = jnp.zeros((1, config.model.sequence_length), jnp.int32)
    params = model.init(jax.random.key(config.seed), tokens_1xL)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def abstract_state(model: nn.Module, optimizer: optax.GradientTransformation, config) -> TrainState:
    """The shapes and dtypes of `init_state`'s result, computed without allocating anything."""
    return jax.eval_shape(lambda: init_state(model, optimizer, config))


def packed_inputs(batch: Batch) -> dict[str, jax.Array]:
    """The model's keyword arguments for a packed batch (several examples per row: its `segment_ids` and
    `positions`, data/sft.py); {} for a plain batch, whose forward is then exactly the unpacked one."""
    if "segment_ids" not in batch:
        return {}
    return {"segment_ids_BxL": batch["segment_ids"], "positions_BxL": batch["positions"]}


def _loss_sums(model: nn.Module, config, params, batch: Batch, dropout_key, shards: int = 1
               ) -> tuple[loss_lib.LossSums, dict[str, jax.Array]]:
    """The micro-batch's loss sums and its MoE metric sums ({} for a dense model).

    `shards` > 1 (an SPMD-partitioned step): the batch is split in that many row blocks over the mesh and the
    fused head runs one chunk loop per block (a loop over the flattened global batch would gather it)."""
    # LoRA's adapter dropout needs the dropout key even when the model itself has no dropout.
    deterministic = config.model.dropout == 0.0 and not (config.finetune.lora.rank and config.finetune.lora.dropout)
    rngs = None if deterministic else {"dropout": dropout_key}
    moe_on = config.moe.n_experts > 0
    # The fused head never materialises the float32 [B, L, V] logits; -1 (auto) picks it for large vocabularies.
    chunk = loss_lib.head_chunk(config.loss.head_chunk, config.model.vocab_size, int(batch["inputs"].size) // shards)
    fused_head = chunk > 0
    out = model.apply({"params": params}, batch["inputs"], deterministic=deterministic, rngs=rngs,
                      return_hidden=fused_head, **packed_inputs(batch),
                      **({"mutable": ["intermediates"]} if moe_on else {}))
    features, variables = out if moe_on else (out, None)
    if fused_head:
        head_DxV = models.lm_head_matrix(params, config.model)

        def fused(hidden_BxLxD, targets_BxL, weights_BxL):
            return loss_lib.chunked_cross_entropy(hidden_BxLxD, head_DxV, targets_BxL, weights_BxL, chunk=chunk,
                                                  label_smoothing=config.loss.label_smoothing, z_loss=config.loss.z_loss,
                                                  softcap=models.logit_softcap(config.model))

        if shards > 1:  # [S, B/S, ...]: one chunk loop per batch shard, each on its own devices
            def split(x):
                x = x.reshape(shards, x.shape[0] // shards, *x.shape[1:])
                return sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))
            per_shard = jax.vmap(fused)(split(features), split(batch["targets"]), split(batch["weights"]))
            sums = jax.tree.map(lambda x: x.sum(0), per_shard)
        else:
            sums = fused(features, batch["targets"], batch["weights"])
    else:
        sums = loss_lib.cross_entropy(features, batch["targets"], batch["weights"],
                                      label_smoothing=config.loss.label_smoothing, z_loss=config.loss.z_loss)
    if not moe_on:
        return sums, {}
    stats = moe_lib.router_stats(variables["intermediates"])
    scalars = moe_lib.scalar_metrics(stats, config.moe.aux_loss_coef, config.moe.z_loss_coef)
    # The aux loss is a per-micro-batch mean; times the micro-batch's weight it becomes a sum like the
    # loss, so the step's final division by the total weight gives the weighted mean over micro-batches.
    weighted = {name: value * sums.weight for name, value in scalars.items()}
    return sums._replace(loss=sums.loss + weighted["moe/aux_loss"]), weighted


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    config, mesh=None) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The uncompiled train step; `compile_train_step` jits it with shardings and donation.

    `mesh`: the mesh the step will be compiled for. On more than one device each device computes the
    gradient of its own rows of the batch (`per_device_sums` below) and one all-reduce per step adds them up;
    None or one device: the plain computation (XLA partitions it if the inputs are sharded, which
    replicates the LM head's and the MoE experts' work on every device).
    """
    base_key = jax.random.key(config.seed)
    sharded = mesh is not None and mesh.size > 1 and sharding.is_data_parallel(mesh)  # the shard_map form
    spmd = mesh is not None and mesh.size > 1 and not sharded  # fsdp / tensor: one partitioned program
    shards = sharding.batch_shards(mesh) if spmd else 1

    def grads_and_sums(params, micro: Batch, key):
        """LoRA params ({"base", "lora"}): only the adapters are differentiated, the frozen base is closed
        over (a QLoRA base holds integer codes, which jax.grad refuses), so the grads are {"lora": ...}."""
        lora = lora_lib.is_lora(params)

        def objective(p):
            sums, moe_sums = _loss_sums(model, config, {"base": params["base"], "lora": p} if lora else p, micro, key,
                                        shards)
            return sums.loss, (sums, moe_sums)

        (_, (sums, moe_sums)), grads = jax.value_and_grad(objective, has_aux=True)(params["lora"] if lora else params)
        grads = {"lora": grads} if lora else grads
        if spmd:  # gradients sharded like their parameters (reduce-scattered, never whole on one device)
            grads = jax.lax.with_sharding_constraint(grads, param_shardings(grads, mesh))
        return grads, sums, moe_sums

    def accumulated_sums(params, batch: Batch, step_key):
        """(grads, LossSums, MoE sums) of the objective's token sums, added over the K micro-batches."""
        n_micro = batch["inputs"].shape[0]
        first = jax.tree.map(lambda x: x[0], batch)
        if n_micro == 1:
            return grads_and_sums(params, first, step_key)

        def accumulate(carry, xs):
            micro, index = xs
            out = grads_and_sums(params, micro, jax.random.fold_in(step_key, index))
            return jax.tree.map(jnp.add, carry, out), None

        shapes = jax.eval_shape(grads_and_sums, params, first, step_key)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        if spmd:
            zeros = (jax.lax.with_sharding_constraint(zeros[0], param_shardings(zeros[0], mesh)), *zeros[1:])
        if sharded:  # the carry holds this device's sums, which differ between devices
            zeros = jax.lax.pcast(zeros, sharding.DATA_AXIS, to="varying")
        out, _ = jax.lax.scan(accumulate, zeros, (batch, jnp.arange(n_micro)))
        return out

    def per_device_sums(params, batch: Batch, step):
        """Inside shard_map: this device's rows of all K micro-batches, then one psum of every sum.

        `params` arrive replicated (unvarying). Differentiating an unvarying input inside shard_map makes
        JAX insert a pvary whose transpose is a psum of the gradient, once per micro-batch; casting the
        params to varying first, outside the differentiated function, keeps each device's gradient local
        until the single psum after the accumulation loop.
        """
        # Each device draws its own dropout masks: with dropout on, a run's masks (not its maths) depend
        # on the number of devices; 1 and N devices agree exactly only with dropout 0.
        step_key = jax.random.fold_in(jax.random.fold_in(base_key, step), jax.lax.axis_index(sharding.DATA_AXIS))
        local = accumulated_sums(jax.lax.pcast(params, sharding.DATA_AXIS, to="varying"), batch, step_key)
        return jax.lax.psum(local, sharding.DATA_AXIS)

    def train_step(state: TrainState, batch: Batch):
        if sharded:
            grads, sums, moe_sums = jax.shard_map(
                per_device_sums, mesh=mesh, in_specs=(P(), P(None, sharding.DATA_AXIS), P()), out_specs=P(),
            )(state.params, batch, state.step)
        else:
            with sharding.partitioned(mesh if spmd else None):  # the model's activation constraints (SPMD)
                grads, sums, moe_sums = accumulated_sums(state.params, batch, jax.random.fold_in(base_key, state.step))
        # The objective is a token sum: dividing by the token count makes it the token mean over all
        # micro-batches (and devices), exactly what one big batch would give.
        weight = jnp.maximum(sums.weight, 1.0)
        # In float32, then back to each gradient's dtype: bf16 params keep bf16 gradients and optimizer state
        # (a float32 quotient would turn AdamW's moments float32 after the first step, and a resume differ).
        grads = jax.tree.map(lambda g: (g / weight).astype(g.dtype), grads)
        grad_norm = optax.tree.norm(grads)
        if lora_lib.is_lora(state.params):  # the frozen base: zeros, which its set_to_zero optimizer ignores
            grads = {"base": jax.tree.map(jnp.zeros_like, state.params["base"]), "lora": grads["lora"]}
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": sums.nll / weight,
            "objective": sums.loss / weight,
            "accuracy": sums.correct / weight,
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            **{name: value / weight for name, value in moe_sums.items()},
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def param_shardings(params, mesh):
    """The NamedSharding of every parameter (or gradient) on `mesh`: replicated on a data-parallel mesh,
    else split by its logical axes (models/axes.py) and the rules of jaxllm/sharding.py."""
    if sharding.is_data_parallel(mesh):
        return jax.tree.map(lambda _: sharding.replicated(mesh), params)
    return sharding.logical_shardings(axes_lib.logical_axes(params), params, mesh)


def state_shardings(abstract: TrainState, mesh) -> TrainState:
    """Shardings of a TrainState (shapes from `abstract_state`): parameters by `param_shardings`, every
    optimizer-state array shaped like a parameter (Adam's moments, Muon's momentum) as that parameter, the
    rest (step counters, scalars) replicated. An optimizer-state array is matched to the parameter whose path
    ends its own path (optax wraps the parameter tree in its state tuples and dicts)."""
    params = param_shardings(abstract.params, mesh)
    replicated = sharding.replicated(mesh)
    by_path = {_dict_path(path): (leaf.shape, params_sharding) for (path, leaf), params_sharding in zip(
        jax.tree_util.tree_flatten_with_path(abstract.params)[0], jax.tree.leaves(params))}

    def opt_sharding(path, leaf):
        names = _dict_path(path)
        for start in range(len(names)):
            match = by_path.get(names[start:])
            if match is not None and match[0] == tuple(leaf.shape):
                return match[1]
        return replicated

    opt_state = jax.tree_util.tree_map_with_path(opt_sharding, abstract.opt_state)
    return TrainState(step=replicated, params=params, opt_state=opt_state)


def _dict_path(path) -> tuple[str, ...]:
    """The dict keys of a key path (tuple indices and attribute names of optax's states left out)."""
    return tuple(str(key.key) for key in path if isinstance(key, jax.tree_util.DictKey))


def compile_train_step(train_step, mesh, shardings: TrainState | None = None):
    """jit the train step: state placed by `shardings` (default: replicated) and donated, batch `[K, B, L]`
    split along B over the batch axes."""
    replicated = sharding.replicated(mesh)
    state_in = replicated if shardings is None else shardings
    return jax.jit(train_step, in_shardings=(state_in, sharding.batch_sharding(mesh, batch_axis=1)),
                   out_shardings=(state_in, replicated), donate_argnums=0)


def make_eval_step(model: nn.Module, config, mesh, params_sharding=None):
    """jit `eval_step(params, batch) -> LossSums` for one `[B, L]` batch (sums: combine over batches).
    `params_sharding`: where the params live (default: replicated)."""
    replicated = sharding.replicated(mesh)
    spmd = mesh.size > 1 and not sharding.is_data_parallel(mesh)

    def eval_step(params, batch: Batch) -> loss_lib.LossSums:
        with sharding.partitioned(mesh if spmd else None):
            logits_BxLxV = model.apply({"params": params}, batch["inputs"], deterministic=True, **packed_inputs(batch))
        return loss_lib.cross_entropy(logits_BxLxV, batch["targets"], batch["weights"])

    return jax.jit(eval_step, in_shardings=(params_sharding or replicated, sharding.batch_sharding(mesh)),
                   out_shardings=replicated)
