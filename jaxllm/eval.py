"""MathQA multiple-choice accuracy and text perplexity: `python -m jaxllm.eval --workdir DIR [--task T] [--format F]`.

`--format jaxllm` (default; what the fine-tune stage reports). Each question is scored five times: context
= K solved train examples + the question's prompt (jaxllm/data/mathqa.py's template, ending in "Answer:"),
continuation = one option's answer text (" c ) 30"). The score of an option is the sum of its continuation
tokens' log-probabilities under the model; `acc` picks the highest, `acc_norm` the highest per character of
the continuation. The K shots of question i are drawn from the shot pool (`mathqa.shot_pool`: the fine-tune
train split) by a seeded function of (mathqa.seed, i), so every model, the fine-tune stage and this CLI all
see the same prompts. Contexts are built to fit `mathqa.eval_max_length` tokens (0 = the training length):
when K shots do not fit, whole shots are dropped, the farthest from the question first, never cut into a
fragment. How many each question really got is reported (`shots_mean`, `shots_min`, `fewer_shots`). llama
has no learned positions and can score contexts longer than it trained on; gpt2 cannot. Only a prompt too
long on its own is still cut from the left (counted in `cut_prompts`). A tokenizer with a BOS (`bos_id`:
Llama 3's <|begin_of_text|>, which such a model was trained with first) puts it before every context, as the
fine-tune's examples do: it counts in the length and is never cut, a cut drops the oldest prompt tokens.

`--format lm-eval`: lm-evaluation-harness's `mathqa` task (prompts, choices, shots, tokenization, acc,
acc_norm and their stderr; jaxllm/lmeval.py says how), scored by the same scorers. `--task perplexity
--data FILE`: the harness's rolling log-likelihood and its word_perplexity, byte_perplexity, bits_per_byte
(plus token perplexity), always in the harness's definitions.

Rows are sorted by length and scored in jit-compiled batches whose length is rounded up to
`mathqa.pad_multiple`, so there are few compilations and little padding; a llama scores each question's
context once, in a KV cache shared by its options.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import config as config_lib
from jaxllm import hugepages, lmeval, models, pretrained, sharding
from jaxllm.generate import load_params, stage_dir
from jaxllm.data import mathqa
from jaxllm.data.sources import DataError
from jaxllm.tokenizer import TokenizerError, get_tokenizer


def _keep_last(ids, n: int) -> list[int]:
    """The last max(n, 0) of `ids` (all of them when there are fewer), as a list."""
    ids = list(ids)
    return ids[max(0, len(ids) - n):]


def token_example(context_ids: list[int], cont_ids: list[int], max_length: int,
                  bos_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ids int32 [n] = [BOS] + context + continuation ids, mask float32 [n] = 1 on the continuation.

    The context is cut from the left so that n <= max_length + 1: lm-eval's (context + continuation)
    [-(max_length + 1):] whenever the continuation fits in max_length. `bos_id` (jaxllm's format; None: no
    BOS) is put first and never cut: the cut takes the oldest context tokens after it. lm-eval's contexts
    carry their BOS in `context_ids` instead, where the harness's own cut may drop it.
    """
    cont_ids = list(cont_ids)[-max_length:]
    keep = max(1, max_length + 1 - len(cont_ids))  # context tokens, the BOS among them
    context_ids = _keep_last(context_ids, keep) if bos_id is None else [bos_id] + _keep_last(context_ids, keep - 1)
    ids = np.asarray(context_ids + cont_ids, np.int32)
    mask = np.concatenate([np.zeros(len(context_ids), np.float32), np.ones(len(cont_ids), np.float32)])
    return ids, mask


def choice_example(tokenizer, context: str, continuation: str, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """`token_example` of the separately encoded context and continuation (no end-of-text), after
    `tokenizer.bos_id` when it has one."""
    return token_example(tokenizer.encode(context), tokenizer.encode(continuation), max_length,
                         bos_id=getattr(tokenizer, "bos_id", None))


def make_score_fn(model, mesh):
    """jit `score(params, batch) -> float32 [B]`: per row, the sum over weighted targets of log p(target)."""
    replicated = sharding.replicated(mesh)

    def score(params, batch):
        logits_BxLxV = model.apply({"params": params}, batch["inputs"], deterministic=True).astype(jnp.float32)
        logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
        target_logp_BxL = jnp.take_along_axis(logp_BxLxV, batch["targets"][..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(batch["weights"] > 0, target_logp_BxL, 0.0), axis=-1)

    return jax.jit(score, in_shardings=(replicated, sharding.batch_sharding(mesh)), out_shardings=replicated)


def make_cached_score_fn(model, mesh):
    """jit `score(params, context_QxP, start_Q, options_KQxC, weights_KQxC) -> float32 [KQ]` for a llama.

    `model` is `models.build(config)`'s, run in its KV-cache mode (models/llama.py). The context of each of
    Q questions runs once (left-padded to P; `start_Q` = its first real position) and fills the cache; the
    K continuations (rows Kq..Kq+K-1, right-padded to C; K = 5 for MathQA) then run on copies of it. The first continuation
    token is scored by the context's last logits. This is the same sum of log-probabilities as
    `make_score_fn`'s, for about a fifth of the compute when contexts are long; MoE layers route each
    token to exactly its top-k experts (dropless), whatever `moe.mode` says (models/moe.py).
    """
    replicated, split = sharding.replicated(mesh), sharding.batch_sharding(mesh)

    def score(params, context_QxP, start_Q, options_KQxC, weights_KQxC):
        q, p = context_QxP.shape
        k, c = options_KQxC.shape[0] // q, options_KQxC.shape[1]
        variables = {"params": params}
        cache = models.init_cache(model, q, p + c)
        logits_QxPxV, cache = model.apply(variables, context_QxP, cache=cache, position=jnp.int32(0), start_B=start_Q)
        cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache)
        logits_KQxCxV, _ = model.apply(variables, options_KQxC, cache=cache, position=jnp.int32(p),
                                       start_B=jnp.repeat(start_Q, k))
        # Token j of a continuation is predicted by position j - 1: the context's last position for j = 0.
        first_KQx1xV = jnp.repeat(logits_QxPxV[:, -1:], k, axis=0)
        logits_KQxCxV = jnp.concatenate([first_KQx1xV, logits_KQxCxV[:, :-1]], axis=1)
        logp = jax.nn.log_softmax(logits_KQxCxV.astype(jnp.float32), axis=-1)
        target_logp_KQxC = jnp.take_along_axis(logp, options_KQxC[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(weights_KQxC > 0, target_logp_KQxC, 0.0), axis=-1)

    jitted = jax.jit(score, in_shardings=(replicated, split, split, split, split), out_shardings=replicated)

    def cached_score(*args):
        return jitted(*args)

    cached_score.cached = True  # tells evaluate_mc which batch layout to build
    return cached_score


def _score_cached(score_fn, params, context_ids, option_ids, *, max_length, batch_size, pad_multiple,
                  mesh) -> tuple[np.ndarray, np.ndarray]:
    """(float64 [N, K] scores, bool [N] context cut) with `make_cached_score_fn`.

    context_ids [N] id lists, option_ids [N][<= K] id lists (K = the most options of any question; a
    question's missing options score 0). Contexts are cut from the left to leave room for the longest
    option rounded up to 8 (the continuation columns), so no option is ever cut.
    """
    n, k = len(context_ids), max(len(row) for row in option_ids)
    c = _option_columns(option_ids)
    cut_N = np.asarray([len(ids) > max_length - c for ids in context_ids], bool)
    context_ids = [list(ids)[-(max_length - c):] for ids in context_ids]
    order = sorted(range(n), key=lambda i: len(context_ids[i]))
    q_batch = max(mesh.size, batch_size // k // mesh.size * mesh.size)
    scores = np.zeros((n, k), np.float64)
    for begin in range(0, n, q_batch):
        chunk = order[begin:begin + q_batch]
        p = mathqa.padded_length([len(context_ids[i]) + 1 for i in chunk], pad_multiple, max_length - c)
        context = np.zeros((q_batch, p), np.int32)
        start = np.full((q_batch,), p - 1, np.int32)
        opts = np.zeros((k * q_batch, c), np.int32)
        weights = np.zeros((k * q_batch, c), np.float32)
        for row, i in enumerate(chunk):
            ids = context_ids[i]
            context[row, p - len(ids):] = ids
            start[row] = p - len(ids)
            for o, option in enumerate(option_ids[i]):
                opts[k * row + o, :len(option)] = option
                weights[k * row + o, :len(option)] = 1.0
        placed = sharding.shard_batch({"context": context, "start": start, "opts": opts, "weights": weights}, mesh)
        out = sharding.to_host(score_fn(params, *placed.values()))  # several processes: every part gathered
        scores[chunk] = out.reshape(q_batch, k)[:len(chunk)]
    return scores, cut_N


def _option_columns(option_ids) -> int:
    """C, the continuation columns of `_score_cached`'s layout: the longest option rounded up to 8 (at least 8)."""
    longest_option = max(len(ids) for row in option_ids for ids in row)
    return max(8, -(-longest_option // 8) * 8)


def _evaluate_cached(score_fn, params, tokenizer, contexts, continuations, *, max_length, batch_size, pad_multiple,
                     mesh) -> np.ndarray:
    """Scores float64 [N, 5] with `make_cached_score_fn`; contexts [N] strings, continuations [N][5] strings.

    A tokenizer's `bos_id` starts each context; a context too long for the context columns (max_length - C)
    keeps its BOS and loses its oldest tokens here, so `_score_cached` cuts nothing more."""
    options = [[tokenizer.encode(text) for text in row] for row in continuations]
    context_ids = [tokenizer.encode(text) for text in contexts]
    bos_id = getattr(tokenizer, "bos_id", None)
    if bos_id is not None:
        room = max_length - _option_columns(options) - 1  # context tokens after the BOS
        context_ids = [[bos_id] + _keep_last(ids, room) for ids in context_ids]
    scores, _ = _score_cached(score_fn, params, context_ids, options, max_length=max_length, batch_size=batch_size,
                              pad_multiple=pad_multiple, mesh=mesh)
    return scores


def _score_rows(score_fn, params, rows, *, max_length, batch_size, pad_multiple, mesh) -> np.ndarray:
    """float64 [len(rows)]: `make_score_fn`'s sum per (ids, mask) row (mathqa.make_batch's layout), rows sorted
    by length into batches of `batch_size` padded to a multiple of `pad_multiple` (few shapes, few compiles)."""
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][0]))
    scores = np.zeros(len(rows), np.float64)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        examples = [rows[r] for r in chunk]
        seq_len = mathqa.padded_length((len(ids) for ids, _ in examples), pad_multiple, max_length)
        batch = sharding.shard_batch(mathqa.make_batch(examples, batch_size, seq_len), mesh)
        scores[chunk] = sharding.to_host(score_fn(params, batch))[:len(chunk)]
    return scores


def mc_contexts(tokenizer, questions, pool, *, shots: int, seed: int, max_length: int):
    """(contexts [N] strings, continuations [N][5] strings, shots_N int [N], cut_N bool [N]).

    Context i = its kept shots (whole solved examples from `pool`, `mathqa.shot_indices(len(pool), shots,
    seed, i)`) + the question's prompt; continuation (i, o) = option o's answer text. Each context, with the
    tokenizer's BOS that the scorers put before it (`bos_id`; none when None), leaves room for the longest
    continuation of all questions rounded up to 8 (the cached layout's continuation columns), so neither
    scoring layout cuts it: shots are dropped whole, the first drawn (farthest from the question) first.
    shots_N counts the shots kept; cut_N marks prompts too long even with none.
    """
    continuations = [[mathqa.format_choice(q, option) for option in range(5)] for q in questions]
    longest = max((len(tokenizer.encode(text)) for row in continuations for text in row), default=0)
    budget = max_length - -(-longest // 8) * 8
    if getattr(tokenizer, "bos_id", None) is not None:
        budget -= 1  # the BOS's place
    contexts, shots_N, cut_N = [], np.zeros(len(questions), np.int64), np.zeros(len(questions), bool)
    for i, q in enumerate(questions):
        picks = mathqa.shot_indices(len(pool), shots, seed, i)
        prompt = mathqa.format_prompt(q)
        for kept in range(len(picks), -1, -1):
            context = mathqa.few_shot_prefix([pool[j] for j in picks[len(picks) - kept:]]) + prompt
            if len(tokenizer.encode(context)) <= budget:
                break
        else:
            cut_N[i] = True
        contexts.append(context)
        shots_N[i] = kept
    return contexts, continuations, shots_N, cut_N


def mc_scores(score_fn, params, tokenizer, contexts, continuations, *, max_length: int, batch_size: int,
              pad_multiple: int, mesh) -> np.ndarray:
    """float64 [N, 5]: the summed log-probabilities of continuation (i, o)'s tokens after [BOS] + context i
    (`mc_contexts`'s strings; the BOS only when `tokenizer.bos_id` is not None), by `score_fn`:
    `make_cached_score_fn`'s (marked by its `cached` attribute) or `make_score_fn`'s (one row per option)."""
    if getattr(score_fn, "cached", False):
        return _evaluate_cached(score_fn, params, tokenizer, contexts, continuations, max_length=max_length,
                                batch_size=batch_size, pad_multiple=pad_multiple, mesh=mesh)
    rows = [choice_example(tokenizer, context, continuation, max_length)
            for context, row in zip(contexts, continuations) for continuation in row]
    scores = _score_rows(score_fn, params, rows, max_length=max_length, batch_size=batch_size,
                         pad_multiple=pad_multiple, mesh=mesh)
    return scores.reshape(len(contexts), 5)


def evaluate_mc(score_fn, params, tokenizer, questions, train_questions, *, shots: int, seed: int, max_length: int,
                batch_size: int, pad_multiple: int, mesh) -> dict:
    """{"n", "acc", "acc_norm", "shots", "shots_mean", "shots_min", "fewer_shots", "cut_prompts"} of
    `questions` (each with five options) under `params`, shots drawn from `train_questions` (`mc_contexts`).

    `shots` is the number asked; shots_mean/shots_min what the questions got (whole shots that fit in
    max_length), fewer_shots how many questions got fewer, cut_prompts how many prompts were cut anyway.
    `score_fn` is `make_score_fn`'s (one row per question x option) or `make_cached_score_fn`'s
    (marked by its `cached` attribute: one context per question, shared by its five options).
    """
    contexts, continuations, shots_N, cut_N = mc_contexts(tokenizer, questions, train_questions, shots=shots,
                                                          seed=seed, max_length=max_length)
    scores_Nx5 = mc_scores(score_fn, params, tokenizer, contexts, continuations, max_length=max_length,
                           batch_size=batch_size, pad_multiple=pad_multiple, mesh=mesh)
    answers = np.asarray([q.answer for q in questions])
    char_lengths_Nx5 = np.asarray([[len(text) for text in row] for row in continuations], np.float64)
    norm_Nx5 = scores_Nx5 / char_lengths_Nx5
    return {"n": len(questions), "shots": shots,
            "acc": float(np.mean(scores_Nx5.argmax(axis=1) == answers)),
            "acc_norm": float(np.mean(norm_Nx5.argmax(axis=1) == answers)),
            "shots_mean": float(np.mean(shots_N)), "shots_min": int(shots_N.min(initial=shots)),
            "fewer_shots": int(np.sum(shots_N < shots)), "cut_prompts": int(np.sum(cut_N))}


def eval_max_length(config) -> int:
    """Tokens of a scored context + option: mathqa.eval_max_length, else the training length
    (mathqa.max_length, else model.sequence_length). ConfigError past gpt2's learned positions."""
    q, m = config.mathqa, config.model
    length = q.get("eval_max_length", 0) or q.max_length or m.sequence_length
    if m.name == "gpt2" and length > m.sequence_length:
        raise config_lib.ConfigError(f"mathqa.eval_max_length ({length}) exceeds gpt2's {m.sequence_length} learned "
                                     f"positions; set it to at most {m.sequence_length} (llama can score longer)")
    return length


def mc_score_fn(model, mesh):
    """The MathQA scorer for `model`: llama keeps one context per question in a KV cache
    (`make_cached_score_fn`); gpt2's learned positions cannot be left-padded (`make_score_fn`)."""
    return make_cached_score_fn(model, mesh) if isinstance(model, models.Llama) else make_score_fn(model, mesh)


def run_mc(config, params, model, tokenizer, mesh, questions, train_questions, shots: int) -> dict:
    """`evaluate_mc` with the batch sizes and lengths of `config.mathqa` (`eval_max_length`), timed."""
    q = config.mathqa
    start = time.monotonic()
    result = evaluate_mc(mc_score_fn(model, mesh), params, tokenizer, questions, train_questions, shots=shots,
                         seed=q.seed, max_length=eval_max_length(config),
                         batch_size=q.eval_batch_size, pad_multiple=q.pad_multiple, mesh=mesh)
    result["seconds"] = time.monotonic() - start
    return result


def evaluate_mc_lmeval(score_fn, params, tokenizer, records, pool_records, *, shots: int, max_length: int,
                       batch_size: int, pad_multiple: int, mesh, limit: int = 0) -> dict:
    """MathQA scored as lm-evaluation-harness scores its `mathqa` task (jaxllm/lmeval.py): {"n", "acc",
    "acc_stderr", "acc_norm", "acc_norm_stderr", "shots", "skipped", "truncated"}.

    `records` are the test split's raw records, `pool_records` the few-shot split's (lmeval.mathqa_requests);
    `score_fn` is `make_score_fn`'s or `make_cached_score_fn`'s. Every shot is kept; a context that does
    not fit is cut from the left (`truncated` counts those questions): per row to max_length + 1 tokens in
    the plain layout, as the harness does, and to max_length - C (C = the longest option rounded up to 8) in
    the cached one, where a question's options share one context.
    """
    docs, _, context_ids, option_ids, skipped = lmeval.mathqa_requests(tokenizer, records, pool_records,
                                                                       shots=shots, limit=limit)
    if not docs:
        raise DataError(f"no MathQA question could be read the harness's way (skipped: {skipped})")
    lls, cut_N = mc_loglikelihoods(score_fn, params, context_ids, option_ids, max_length=max_length,
                                   batch_size=batch_size, pad_multiple=pad_multiple, mesh=mesh)
    return {**lmeval.mc_metrics(lls, docs), "shots": shots, "skipped": skipped, "truncated": int(np.sum(cut_N))}


def mc_loglikelihoods(score_fn, params, context_ids, option_ids, *, max_length: int, batch_size: int,
                      pad_multiple: int, mesh) -> tuple[list[np.ndarray], np.ndarray]:
    """(lls, cut_N): lls[i] float64 [len(option_ids[i])] = the summed log-probabilities of each option's ids
    after context_ids[i]; cut_N bool [N] marks the contexts cut from the left to fit (see evaluate_mc_lmeval)."""
    if getattr(score_fn, "cached", False):
        scores_NxK, cut_N = _score_cached(score_fn, params, context_ids, option_ids, max_length=max_length,
                                          batch_size=batch_size, pad_multiple=pad_multiple, mesh=mesh)
        return [scores_NxK[i, :len(row)] for i, row in enumerate(option_ids)], cut_N
    rows = [token_example(ctx, cont, max_length) for ctx, row in zip(context_ids, option_ids) for cont in row]
    flat = _score_rows(score_fn, params, rows, max_length=max_length, batch_size=batch_size,
                       pad_multiple=pad_multiple, mesh=mesh)
    bounds = np.cumsum([0] + [len(row) for row in option_ids])
    cut_N = np.asarray([len(ctx) + max(map(len, row)) > max_length + 1 for ctx, row in zip(context_ids, option_ids)],
                       bool)
    return [flat[bounds[i]:bounds[i + 1]] for i in range(len(option_ids))], cut_N


def evaluate_perplexity(score_fn, params, tokenizer, texts: list[str], *, max_length: int, batch_size: int,
                        pad_multiple: int, mesh) -> dict:
    """lm-eval's rolling log-likelihood perplexity of documents `texts` (lmeval.rolling_windows,
    lmeval.perplexity_metrics) with `make_score_fn`'s scorer: every window of every document, sorted by
    length into batches of `batch_size` rows padded to multiples of `pad_multiple`."""
    prefix_id = getattr(tokenizer, "bos_id", None)
    prefix_id = tokenizer.eot_id if prefix_id is None else prefix_id
    rows, owner_W, token_counts = [], [], []
    for d, text in enumerate(texts):
        ids = tokenizer.encode(text)
        token_counts.append(len(ids))
        for window, n in lmeval.rolling_windows(ids, prefix_id, max_length):
            mask = np.zeros(len(window), np.float32)
            mask[len(window) - n:] = 1.0
            rows.append((np.asarray(window, np.int32), mask))
            owner_W.append(d)
    scores_W = _score_rows(score_fn, params, rows, max_length=max_length, batch_size=batch_size,
                           pad_multiple=pad_multiple, mesh=mesh)
    lls_D = np.bincount(np.asarray(owner_W, np.int64), weights=scores_W, minlength=len(texts))
    return {**lmeval.perplexity_metrics(lls_D, texts, token_counts), "windows": len(rows), "max_length": max_length}


def perplexity_max_length(config, requested: int | None) -> int:
    """Tokens per perplexity window: `requested` (--max_length), else the training length; gpt2 cannot go
    past its learned positions (ConfigError)."""
    m = config.model
    length = requested or m.sequence_length
    if length < 1:
        raise config_lib.ConfigError(f"--max_length must be at least 1 (got {length})")
    if m.name == "gpt2" and length > m.sequence_length:
        raise config_lib.ConfigError(f"--max_length ({length}) exceeds gpt2's {m.sequence_length} learned positions; "
                                     f"set it to at most {m.sequence_length}")
    return length


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.eval", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a run folder (its finetune stage when it has stages)")
    source.add_argument("--init_from", help="an imported model instead: hf:FOLDER_OR_REPO_ID or gguf:FILE")
    parser.add_argument("--out", default=None, help="folder for eval.jsonl and TensorBoard (default: the run "
                                                    "folder; with --init_from: none, the row is printed only)")
    parser.add_argument("--task", default="mathqa", choices=["mathqa", "perplexity"])
    parser.add_argument("--format", default="jaxllm", choices=["jaxllm", "lm-eval"],
                        help="MathQA prompts and scoring: jaxllm's (the fine-tune's template) or lm-evaluation-harness's "
                             "`mathqa` task (jaxllm/lmeval.py); perplexity is always lm-eval's")
    parser.add_argument("--data", default=None,
                        help="mathqa: a local MathQA folder or file (default: the run's mathqa config); perplexity "
                             "(required): a .txt file, a .jsonl/.parquet file with a `text` field, or a folder of them")
    parser.add_argument("--split", default=None, help="split name or file to score (default: mathqa.test_split)")
    parser.add_argument("--fewshot_split", default=None,
                        help="split name or file the shots come from (default: mathqa.train_split; lm-eval's "
                             "harness draws from MathQA's whole train split, train.json in its order)")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--max_questions", type=int, default=0,
                        help="score only the first N questions (lm-eval: its --limit); 0 = all")
    parser.add_argument("--max_length", type=int, default=None,
                        help="tokens per scored context + option (default: the run's mathqa.eval_max_length), or per "
                             "perplexity window (default: the training sequence length)")
    parser.add_argument("--batch_size", type=int, default=0,
                        help="rows per scoring batch (default: mathqa.eval_batch_size; perplexity: 8192 tokens' worth)")
    args = parser.parse_args(argv)
    if args.task == "perplexity" and not args.data:
        parser.error("--task perplexity needs --data: a .txt file, a .jsonl/.parquet file with a `text` field, "
                     "or a folder of them")
    fmt = "lm-eval" if args.task == "perplexity" else args.format
    try:
        if args.init_from:
            if not pretrained.is_external(args.init_from):
                raise config_lib.ConfigError(f"--init_from {args.init_from} is not hf:FOLDER_OR_REPO_ID or gguf:FILE; "
                                             f"use --workdir for a jaxllm run")
            run_dir = None
            config = pretrained.adopt(config_lib.default_config(), args.init_from)
            config.train.num_devices = 1
        else:
            run_dir = stage_dir(pathlib.Path(args.workdir))
            if not (run_dir / "config.json").is_file():
                raise DataError(f"{run_dir} has no config.json; point --workdir at a jaxllm run folder")
            config = config_lib.from_json((run_dir / "config.json").read_text())
        if args.fewshot_split:
            config.mathqa.train_split = args.fewshot_split
        if args.data and args.task == "mathqa":
            data = pathlib.Path(args.data)
            config.mathqa.source = "local"
            if data.is_file():
                config.mathqa.test_split = str(data)
            else:
                config.mathqa.path = str(data)
        if args.split:
            config.mathqa.test_split = args.split
        if args.max_length is not None and args.task == "mathqa":
            config.mathqa.eval_max_length = args.max_length
        tokenizer = get_tokenizer(config.data.tokenizer, config.data.tokenizer_path)
        info = {}
        if args.task == "perplexity":
            max_length = perplexity_max_length(config, args.max_length)
            texts, skipped = lmeval.read_texts(args.data)
            info = {"data": args.data, "skipped": skipped}
        elif fmt == "lm-eval":
            fewshot_split = args.fewshot_split or config.mathqa.train_split
            if args.shots and fewshot_split == config.mathqa.test_split:
                raise DataError(f"the few-shot split and the scored split are both '{fewshot_split}'; name another "
                                f"with --fewshot_split (the harness draws MathQA's shots from its train split)")
            records = mathqa.load_records(config.mathqa, config.mathqa.test_split)
            pool_records = mathqa.load_records(config.mathqa, fewshot_split) if args.shots else []
            info = {"split": config.mathqa.test_split, "fewshot_split": fewshot_split if args.shots else None}
        else:
            questions, report = mathqa.load_questions(config.mathqa, config.mathqa.test_split)
            train_questions = mathqa.shot_pool(config.mathqa) if args.shots else []  # the fine-tune stage's pool
            if args.max_questions:
                questions = questions[:args.max_questions]
            info = {"split": config.mathqa.test_split}
        if run_dir is None:
            params, step = jax.tree.map(jnp.asarray, pretrained.load_params(args.init_from)), 0
        else:
            params, step = load_params(run_dir, config)
        mesh = sharding.make_mesh(min(config.train.num_devices, jax.device_count()))  # the run may have had more
        if args.batch_size:
            config.mathqa.eval_batch_size = args.batch_size
        if config.mathqa.eval_batch_size % mesh.size:
            config.mathqa.eval_batch_size = _round_up(config.mathqa.eval_batch_size, mesh.size)
        model = models.build(config)
        start = time.monotonic()
        if args.task == "perplexity":
            batch_size = _round_up(args.batch_size or max(1, 8192 // max_length), mesh.size)
            result = evaluate_perplexity(make_score_fn(model, mesh), params, tokenizer, texts, max_length=max_length,
                                         batch_size=batch_size, pad_multiple=config.mathqa.pad_multiple, mesh=mesh)
        elif fmt == "lm-eval":
            result = evaluate_mc_lmeval(mc_score_fn(model, mesh), params, tokenizer, records, pool_records,
                                        shots=args.shots, max_length=eval_max_length(config),
                                        batch_size=config.mathqa.eval_batch_size,
                                        pad_multiple=config.mathqa.pad_multiple, mesh=mesh, limit=args.max_questions)
        else:
            result = run_mc(config, params, model, tokenizer, mesh, questions, train_questions, args.shots)
            result["parse"] = report.summary()
        result["seconds"] = time.monotonic() - start
    except (DataError, TokenizerError, checkpoint_lib.CheckpointError, config_lib.ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    row = {"task": args.task, "format": fmt, **info, "model": args.init_from or str(run_dir), "step": step, **result}
    out_dir = pathlib.Path(args.out) if args.out else run_dir
    if out_dir is None:
        print(json.dumps(row))
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "eval.jsonl", "a") as file:
        file.write(json.dumps(row) + "\n")
    from tensorboardX import SummaryWriter

    if args.task == "perplexity":
        scalars = {f"perplexity/{name}": result[name]
                   for name in ("word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity")}
    else:
        prefix = f"mathqa_{args.shots}shot" if fmt == "jaxllm" else f"mathqa_lmeval_{args.shots}shot"
        names = ("acc", "acc_norm", "shots_mean") if fmt == "jaxllm" else ("acc", "acc_norm")
        scalars = {f"{prefix}/{name}": result[name] for name in names}
    with SummaryWriter(str(out_dir / "tensorboard")) as tb:
        for tag, value in scalars.items():
            tb.add_scalar(tag, value, step)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()  # before anything runs: see jaxllm/hugepages.py
    sys.exit(main())
