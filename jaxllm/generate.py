"""Sampling with a KV cache: `python -m jaxllm.generate --workdir DIR | --init_from hf:PATH --prompt TEXT [...]`.

Decoding runs the training model itself (`models.build(config)`: llama or gpt2, dense or mixture of
experts) in its cache mode (models/llama.py): `model.apply(..., cache=..., position=p)` processes T new
tokens at positions p .. p + T - 1, writes their keys and values into the cache (`models.init_cache`: per
layer [B, S, G, K]) and attends to every cached position <= its own. The prompt is one call (prefill), then
one call per new token inside a `lax.scan`; the whole `generate` is jit-compiled for a given model, prompt
length and `max_new_tokens`. MoE layers route each token to exactly its top-k experts (dropless) whatever
`moe.mode` says: a one-token step has no sequence to share a capacity over (models/moe.py).

temperature 0 is greedy (argmax); otherwise logits / temperature, optionally restricted to the top_k,
sampled with a key derived from (seed, position).
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import config as config_lib
from jaxllm import hugepages, models, pretrained
from jaxllm.config import ConfigError
from jaxllm.models import lora as lora_lib
from jaxllm.tokenizer import TokenizerError, get_tokenizer


def _pick(logits_BxV, key, temperature: float, top_k: int):
    if temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / temperature
    if top_k:
        kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "vocab"))
def _generate(params, prompt_BxP, seed, *, model, max_new_tokens: int, temperature: float, top_k: int, vocab: int):
    b, p = prompt_BxP.shape
    cache = models.init_cache(model, b, p + max_new_tokens)
    logits, cache = model.apply({"params": params}, prompt_BxP, cache=cache, position=jnp.int32(0))
    base_key = jax.random.key(seed)
    first = _pick(logits[:, -1, :vocab], jax.random.fold_in(base_key, p), temperature, top_k)

    def step(carry, index):
        token_B, cache = carry
        logits, cache = model.apply({"params": params}, token_B[:, None], cache=cache, position=p + index)
        nxt = _pick(logits[:, -1, :vocab], jax.random.fold_in(base_key, p + index + 1), temperature, top_k)
        return (nxt, cache), token_B

    (_, _), tokens_NxB = jax.lax.scan(step, (first, cache), jnp.arange(max_new_tokens))
    return tokens_NxB.T


def generate(model, params, prompt_BxP, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             seed: int = 0, vocab: int | None = None) -> jax.Array:
    """int32 [B, max_new_tokens]: tokens sampled after `prompt_BxP` (int32) by `model` (`models.build`'s;
    LoRA params merged first). `vocab` limits the ids that can be sampled (the tokenizer's, not the padded
    model vocabulary). A gpt2 cannot go past its learned positions: ConfigError."""
    prompt_BxP = jnp.asarray(prompt_BxP, jnp.int32)
    length = prompt_BxP.shape[1] + max_new_tokens
    if isinstance(model, models.GPT2) and length > model.sequence_length:
        raise ConfigError(f"the prompt ({prompt_BxP.shape[1]} tokens) and --max_new_tokens ({max_new_tokens}) "
                          f"exceed gpt2's {model.sequence_length} learned positions; ask for fewer tokens")
    return _generate(params, prompt_BxP, seed, model=model, max_new_tokens=max_new_tokens,
                     temperature=float(temperature), top_k=int(top_k), vocab=int(vocab or model.vocab_size))


def stage_dir(workdir: pathlib.Path) -> pathlib.Path:
    """The folder of the run to evaluate: workdir/finetune when the workdir holds stages, else workdir."""
    for name in ("finetune", "pretrain"):
        if (workdir / name / "config.json").is_file():
            return workdir / name
    return workdir


def load_params(run_dir: pathlib.Path, config):
    """Params of the newest checkpoint in `run_dir` (LoRA adapters merged, a QLoRA base dequantized), float32."""
    folder, step = checkpoint_lib.locate(run_dir)
    checkpointer = checkpoint_lib.Checkpointer(folder, read_only=True)
    try:
        params = checkpointer.restore_params(step)
    finally:
        checkpointer.close()
    params = lora_lib.merge(params, config.finetune.lora)
    return jax.tree.map(jnp.asarray, params), step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.generate", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a jaxllm run folder (its newest checkpoint)")
    source.add_argument("--init_from", help="an imported model instead: hf:FOLDER_OR_REPO_ID or gguf:FILE")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.init_from:
            if not pretrained.is_external(args.init_from):
                raise ConfigError(f"--init_from {args.init_from} is not hf:FOLDER_OR_REPO_ID or gguf:FILE; "
                                  f"use --workdir for a jaxllm run")
            config = pretrained.adopt(config_lib.default_config(), args.init_from)
            params = pretrained.load_params(args.init_from)
        else:
            run_dir = stage_dir(pathlib.Path(args.workdir))
            config = config_lib.from_json((run_dir / "config.json").read_text())
            params, _ = load_params(run_dir, config)
        tokenizer = get_tokenizer(config.data.tokenizer, config.data.tokenizer_path)
        bos = getattr(tokenizer, "bos_id", None)  # a model trained with a BOS (Llama 3) expects one first
        prompt = ([bos] if bos is not None else []) + tokenizer.encode(args.prompt)
        out = generate(models.build(config), params, [prompt], max_new_tokens=args.max_new_tokens,
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
