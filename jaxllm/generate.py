"""Sampling with a KV cache: `python -m jaxllm.generate --workdir DIR --prompt TEXT [--max_new_tokens N ...]`.

The training model is not changed: decoding runs the llama's math directly on its parameter tree
(models/llama.py: embed, blocks_i/{attn_norm, attn/{q,k,v,o}, mlp_norm, mlp/{w1,w3,w2}}, norm_f, tied or
untied head) with the same layers (RMSNorm in float32, RoPE on adjacent pairs at float32 positions,
grouped-query heads) and the same dtypes (matmuls in the compute dtype, the residual stream in
`layers.residual_dtype(model_cfg)`). Its attention is its own einsum over the cache, whatever
`model.attention` says: a step attends 1 query to S cached positions under a mask, not the square
causal shape the training kernels take. `forward_cached` processes T new tokens at positions pos..pos+T-1, writing their
keys and values into a cache of [n_layer, B, S, G, K] arrays and attending to every cached position
<= its own. The prompt is one call (prefill), then one call per new token inside a `lax.scan`; the whole
`generate` is jit-compiled for a given prompt length and `max_new_tokens`.

temperature 0 is greedy (argmax); otherwise logits / temperature, optionally restricted to the top_k,
sampled with a key derived from (seed, position).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import config as config_lib
from jaxllm import hugepages
from jaxllm.models import layers
from jaxllm.models import lora as lora_lib
from jaxllm.tokenizer import TokenizerError, get_tokenizer


def _rmsnorm(x_BxTxD, scale_D, eps, dtype):
    x32 = x_BxTxD.astype(jnp.float32)
    y32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps) * scale_D.astype(jnp.float32)
    return y32.astype(dtype)


def init_cache(model_cfg, batch: int, size: int, dtype) -> dict[str, jax.Array]:
    """Zeroed keys and values, each [n_layer, B, S, G, K] in `dtype`."""
    g = model_cfg.n_kv_head or model_cfg.n_head
    k = model_cfg.n_embd // model_cfg.n_head
    shape = (model_cfg.n_layer, batch, size, g, k)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def forward_cached(params, model_cfg, tokens_BxT: jax.Array, cache: dict, pos: jax.Array, start_B=None):
    """Logits float32 [B, T, V] of T tokens at positions pos..pos+T-1, and the cache with their keys/values.

    `start_B` (int32 [B], optional) hides cache positions before it from row b: rows left-padded to a
    common length. RoPE depends only on relative positions, so a left-padded row scores as unpadded.
    """
    m = model_cfg
    dtype = jnp.dtype(m.dtype)
    stream = layers.residual_dtype(m)  # the residual stream's dtype, as in the model's blocks
    b, t = tokens_BxT.shape
    h, g = m.n_head, m.n_kv_head or m.n_head
    r, k = h // g, m.n_embd // m.n_head
    size = cache["k"].shape[2]
    embedding_VxD = params["embed"]["embedding"]
    x_BxTxD = embedding_VxD[tokens_BxT].astype(stream)
    positions_T = pos + jnp.arange(t)
    cos, sin = layers.rope_angles(positions_T, k, m.rope_theta)
    # Query at position p sees cached keys at positions <= p (later slots are zeros or stale).
    visible_TxS = jnp.arange(size)[None, :] <= positions_T[:, None]
    if start_B is not None:
        visible_TxS = visible_TxS[None] & (jnp.arange(size)[None, None, :] >= start_B[:, None, None])  # [B, T, S]
        visible_TxS = visible_TxS[:, None, None]  # broadcast over the G, R head axes of the scores
    new_k, new_v = [], []
    for i in range(m.n_layer):
        p = params[f"blocks_{i}"]
        hn = _rmsnorm(x_BxTxD, p["attn_norm"]["scale"], m.norm_eps, dtype)
        a = p["attn"]
        q_BxTxHxK = (hn @ a["q"]["kernel"].astype(dtype)).reshape(b, t, h, k)
        k_BxTxGxK = (hn @ a["k"]["kernel"].astype(dtype)).reshape(b, t, g, k)
        v_BxTxGxK = (hn @ a["v"]["kernel"].astype(dtype)).reshape(b, t, g, k)
        q_BxTxHxK = layers.apply_rope(q_BxTxHxK, cos, sin)
        k_BxTxGxK = layers.apply_rope(k_BxTxGxK, cos, sin)
        keys_BxSxGxK = jax.lax.dynamic_update_slice(cache["k"][i], k_BxTxGxK.astype(cache["k"].dtype), (0, pos, 0, 0))
        values_BxSxGxK = jax.lax.dynamic_update_slice(cache["v"][i], v_BxTxGxK.astype(cache["v"].dtype), (0, pos, 0, 0))
        new_k.append(keys_BxSxGxK)
        new_v.append(values_BxSxGxK)
        q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, g, r, k)
        scores = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, keys_BxSxGxK.astype(dtype),
                            preferred_element_type=jnp.float32) / math.sqrt(k)
        scores = jnp.where(visible_TxS, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        out_BxTxGxRxK = jnp.einsum("bgrts,bsgk->btgrk", probs.astype(dtype), values_BxSxGxK.astype(dtype))
        x_BxTxD = x_BxTxD + (out_BxTxGxRxK.reshape(b, t, h * k) @ a["o"]["kernel"].astype(dtype)).astype(stream)
        hn = _rmsnorm(x_BxTxD, p["mlp_norm"]["scale"], m.norm_eps, dtype)
        f = p["mlp"]
        gate = hn @ f["w1"]["kernel"].astype(dtype)
        up = hn @ f["w3"]["kernel"].astype(dtype)
        x_BxTxD = x_BxTxD + ((jax.nn.silu(gate) * up) @ f["w2"]["kernel"].astype(dtype)).astype(stream)
    x_BxTxD = _rmsnorm(x_BxTxD, params["norm_f"]["scale"], m.norm_eps, dtype)
    if "lm_head" in params:
        logits = jnp.einsum("btd,dv->btv", x_BxTxD, params["lm_head"]["kernel"].astype(dtype),
                            preferred_element_type=jnp.float32)
    else:
        logits = layers.tied_logits(x_BxTxD, embedding_VxD, dtype)
    return logits, {"k": jnp.stack(new_k), "v": jnp.stack(new_v)}


def _pick(logits_BxV, key, temperature: float, top_k: int):
    if temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / temperature
    if top_k:
        kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model_cfg_json", "max_new_tokens", "temperature", "top_k", "vocab"))
def _generate(params, prompt_BxP, seed, *, model_cfg_json: str, max_new_tokens: int, temperature: float, top_k: int,
              vocab: int):
    model_cfg = config_lib.from_json(model_cfg_json)
    b, p = prompt_BxP.shape
    cache = init_cache(model_cfg, b, p + max_new_tokens, jnp.dtype(model_cfg.dtype))
    logits, cache = forward_cached(params, model_cfg, prompt_BxP, cache, jnp.int32(0))
    base_key = jax.random.key(seed)
    first = _pick(logits[:, -1, :vocab], jax.random.fold_in(base_key, p), temperature, top_k)

    def step(carry, index):
        token_B, cache = carry
        logits, cache = forward_cached(params, model_cfg, token_B[:, None], cache, p + index)
        nxt = _pick(logits[:, -1, :vocab], jax.random.fold_in(base_key, p + index + 1), temperature, top_k)
        return (nxt, cache), token_B

    (_, _), tokens_NxB = jax.lax.scan(step, (first, cache), jnp.arange(max_new_tokens))
    return tokens_NxB.T


def generate(params, model_cfg, prompt_BxP, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             seed: int = 0, vocab: int | None = None) -> jax.Array:
    """int32 [B, max_new_tokens]: tokens sampled after `prompt_BxP` (int32). `vocab` limits the ids that can
    be sampled (the tokenizer's, not the padded model vocabulary)."""
    if model_cfg.name != "llama":
        raise ValueError(f"KV-cache generation supports llama; model.name is '{model_cfg.name}'")
    cfg = json.dumps(model_cfg.to_dict(), sort_keys=True)
    return _generate(params, jnp.asarray(prompt_BxP, jnp.int32), seed, model_cfg_json=cfg,
                     max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                     vocab=int(vocab or model_cfg.vocab_size))


def stage_dir(workdir: pathlib.Path) -> pathlib.Path:
    """The folder of the run to evaluate: workdir/finetune when the workdir holds stages, else workdir."""
    for name in ("finetune", "pretrain"):
        if (workdir / name / "config.json").is_file():
            return workdir / name
    return workdir


def load_params(run_dir: pathlib.Path, config):
    """Params of the newest checkpoint in `run_dir` (LoRA adapters merged), as saved (float32)."""
    folder, step = checkpoint_lib.locate(run_dir)
    checkpointer = checkpoint_lib.Checkpointer(folder, read_only=True)
    try:
        params = checkpointer.restore_params(step)
    finally:
        checkpointer.close()
    params = lora_lib.merge(params, config.finetune.lora.alpha)
    return jax.tree.map(jnp.asarray, params), step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        run_dir = stage_dir(pathlib.Path(args.workdir))
        config = config_lib.from_json((run_dir / "config.json").read_text())
        tokenizer = get_tokenizer(config.data.tokenizer, config.data.tokenizer_path)
        params, _ = load_params(run_dir, config)
        prompt = tokenizer.encode(args.prompt)
        out = generate(params, config.model, [prompt], max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, seed=args.seed, vocab=tokenizer.n_vocab)
    except (OSError, TokenizerError, checkpoint_lib.CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    ids = [int(i) for i in out[0]]
    if tokenizer.eot_id in ids:
        ids = ids[:ids.index(tokenizer.eot_id)]
    print(args.prompt + tokenizer.decode(ids))
    return 0


if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()  # before anything runs: see jaxllm/hugepages.py
    sys.exit(main())
