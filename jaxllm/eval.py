"""MathQA multiple-choice accuracy, lm-eval-harness style: `python -m jaxllm.eval --workdir DIR [--shots K]`.

Each question is scored five times: context = K solved train examples + the question's prompt
(jaxllm/data/mathqa.py's template, ending in "Answer:"), continuation = one option's answer text
(" c ) 30"). The score of an option is the sum of its continuation tokens' log-probabilities under the
model; `acc` picks the highest, `acc_norm` the highest per character of the continuation. The K shots of
question i are drawn from the shot pool (`mathqa.shot_pool`: the fine-tune train split) by a seeded
function of (mathqa.seed, i), so every model, the fine-tune stage and this CLI all see the same prompts.

Contexts are built to fit `mathqa.eval_max_length` tokens (0 = the training length): when K shots do not
fit, whole shots are dropped, the farthest from the question first, never cut into a fragment. How many
each question really got is reported (`shots_mean`, `shots_min`, `fewer_shots`). llama has no learned
positions and can score contexts longer than it trained on; gpt2 cannot. Only a prompt too long on its
own is still cut from the left (counted in `cut_prompts`).

Rows (question x option) are sorted by length and scored in jit-compiled batches whose length is rounded
up to `mathqa.pad_multiple`, so there are few compilations and little padding.
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
from jaxllm import hugepages, models, sharding
from jaxllm.generate import load_params, stage_dir
from jaxllm.data import mathqa
from jaxllm.data.sources import DataError
from jaxllm.tokenizer import TokenizerError, get_tokenizer


def choice_example(tokenizer, context: str, continuation: str, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """ids int32 [n] = context + continuation (no end-of-text), mask float32 [n] = 1 on the continuation.

    The context is cut from the left so that n <= max_length + 1.
    """
    context_ids, cont_ids = tokenizer.encode(context), tokenizer.encode(continuation)
    cont_ids = cont_ids[-max_length:]
    keep = max(1, max_length + 1 - len(cont_ids))
    context_ids = context_ids[-keep:]
    ids = np.asarray(context_ids + cont_ids, np.int32)
    mask = np.concatenate([np.zeros(len(context_ids), np.float32), np.ones(len(cont_ids), np.float32)])
    return ids, mask


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
    """jit `score(params, context_QxP, start_Q, options_5QxC, weights_5QxC) -> float32 [5Q]` for a llama.

    `model` is `models.build(config)`'s, run in its KV-cache mode (models/llama.py). The context of each of
    Q questions runs once (left-padded to P; `start_Q` = its first real position) and fills the cache; the
    five continuations (rows 5q..5q+4, right-padded to C) then run on copies of it. The first continuation
    token is scored by the context's last logits. This is the same sum of log-probabilities as
    `make_score_fn`'s, for about a fifth of the compute when contexts are long; MoE layers route each
    token to exactly its top-k experts (dropless), whatever `moe.mode` says (models/moe.py).
    """
    replicated, split = sharding.replicated(mesh), sharding.batch_sharding(mesh)

    def score(params, context_QxP, start_Q, options_5QxC, weights_5QxC):
        q, p = context_QxP.shape
        c = options_5QxC.shape[1]
        variables = {"params": params}
        cache = models.init_cache(model, q, p + c)
        logits_QxPxV, cache = model.apply(variables, context_QxP, cache=cache, position=jnp.int32(0), start_B=start_Q)
        cache = jax.tree.map(lambda x: jnp.repeat(x, 5, axis=0), cache)
        logits_5QxCxV, _ = model.apply(variables, options_5QxC, cache=cache, position=jnp.int32(p),
                                       start_B=jnp.repeat(start_Q, 5))
        # Token j of a continuation is predicted by position j - 1: the context's last position for j = 0.
        first_5Qx1xV = jnp.repeat(logits_QxPxV[:, -1:], 5, axis=0)
        logits_5QxCxV = jnp.concatenate([first_5Qx1xV, logits_5QxCxV[:, :-1]], axis=1)
        logp = jax.nn.log_softmax(logits_5QxCxV.astype(jnp.float32), axis=-1)
        target_logp_5QxC = jnp.take_along_axis(logp, options_5QxC[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(weights_5QxC > 0, target_logp_5QxC, 0.0), axis=-1)

    jitted = jax.jit(score, in_shardings=(replicated, split, split, split, split), out_shardings=replicated)

    def cached_score(*args):
        return jitted(*args)

    cached_score.cached = True  # tells evaluate_mc which batch layout to build
    return cached_score


def _evaluate_cached(score_fn, params, tokenizer, contexts, continuations, *, max_length, batch_size, pad_multiple,
                     mesh) -> np.ndarray:
    """Scores float64 [N, 5] with `make_cached_score_fn`; contexts [N] strings, continuations [N][5] strings."""
    n = len(contexts)
    options = [[tokenizer.encode(text) for text in row] for row in continuations]
    longest_option = max(len(ids) for row in options for ids in row)
    c = -(-longest_option // 8) * 8
    context_ids = [tokenizer.encode(text)[-(max_length - c):] for text in contexts]
    order = sorted(range(n), key=lambda i: len(context_ids[i]))
    q_batch = max(mesh.size, batch_size // 5 // mesh.size * mesh.size)
    scores = np.zeros((n, 5), np.float64)
    for begin in range(0, n, q_batch):
        chunk = order[begin:begin + q_batch]
        p = mathqa.padded_length([len(context_ids[i]) + 1 for i in chunk], pad_multiple, max_length - c)
        context = np.zeros((q_batch, p), np.int32)
        start = np.full((q_batch,), p - 1, np.int32)
        opts = np.zeros((5 * q_batch, c), np.int32)
        weights = np.zeros((5 * q_batch, c), np.float32)
        for row, i in enumerate(chunk):
            ids = context_ids[i]
            context[row, p - len(ids):] = ids
            start[row] = p - len(ids)
            for o, option in enumerate(options[i]):
                opts[5 * row + o, :len(option)] = option
                weights[5 * row + o, :len(option)] = 1.0
        arrays = [jax.device_put(a, sharding.batch_sharding(mesh)) for a in (context, start, opts, weights)]
        out = np.asarray(jax.device_get(score_fn(params, *arrays)))
        scores[chunk] = out.reshape(q_batch, 5)[:len(chunk)]
    return scores


def mc_contexts(tokenizer, questions, pool, *, shots: int, seed: int, max_length: int):
    """(contexts [N] strings, continuations [N][5] strings, shots_N int [N], cut_N bool [N]).

    Context i = its kept shots (whole solved examples from `pool`, `mathqa.shot_indices(len(pool), shots,
    seed, i)`) + the question's prompt; continuation (i, o) = option o's answer text. Each context leaves
    room for the longest continuation of all questions rounded up to 8 (the cached layout's continuation
    columns), so neither scoring layout cuts it: shots are dropped whole, the first drawn (farthest from
    the question) first. shots_N counts the shots kept; cut_N marks prompts too long even with none.
    """
    continuations = [[mathqa.format_choice(q, option) for option in range(5)] for q in questions]
    longest = max((len(tokenizer.encode(text)) for row in continuations for text in row), default=0)
    budget = max_length - -(-longest // 8) * 8
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
    if getattr(score_fn, "cached", False):
        scores_Nx5 = _evaluate_cached(score_fn, params, tokenizer, contexts, continuations, max_length=max_length,
                                      batch_size=batch_size, pad_multiple=pad_multiple, mesh=mesh)
    else:
        rows = [choice_example(tokenizer, context, continuation, max_length)
                for context, row in zip(contexts, continuations) for continuation in row]
        order = sorted(range(len(rows)), key=lambda r: len(rows[r][0]))
        scores = np.zeros(len(rows), np.float64)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            examples = [rows[r] for r in chunk]
            seq_len = mathqa.padded_length((len(ids) for ids, _ in examples), pad_multiple, max_length)
            batch = sharding.shard_batch(mathqa.make_batch(examples, batch_size, seq_len), mesh)
            scores[chunk] = np.asarray(jax.device_get(score_fn(params, batch)))[:len(chunk)]
        scores_Nx5 = scores.reshape(len(questions), 5)
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


def run_mc(config, params, model, tokenizer, mesh, questions, train_questions, shots: int) -> dict:
    """`evaluate_mc` with the batch sizes and lengths of `config.mathqa` (`eval_max_length`), timed."""
    q = config.mathqa
    start = time.monotonic()
    # llama: one context per question in a KV cache; gpt2's learned positions cannot be left-padded.
    score_fn = make_cached_score_fn(model, mesh) if isinstance(model, models.Llama) else make_score_fn(model, mesh)
    result = evaluate_mc(score_fn, params, tokenizer, questions, train_questions, shots=shots,
                         seed=q.seed, max_length=eval_max_length(config),
                         batch_size=q.eval_batch_size, pad_multiple=q.pad_multiple, mesh=mesh)
    result["seconds"] = time.monotonic() - start
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.eval", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a run folder (its finetune stage when it has stages)")
    parser.add_argument("--task", default="mathqa", choices=["mathqa"])
    parser.add_argument("--data", default=None, help="a local MathQA folder or file (default: the run's mathqa config)")
    parser.add_argument("--split", default=None, help="split name or file to score (default: mathqa.test_split)")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--max_questions", type=int, default=0, help="score only the first N questions; 0 = all")
    parser.add_argument("--max_length", type=int, default=None,
                        help="tokens per scored context + option (default: the run's mathqa.eval_max_length)")
    args = parser.parse_args(argv)
    try:
        run_dir = stage_dir(pathlib.Path(args.workdir))
        if not (run_dir / "config.json").is_file():
            raise DataError(f"{run_dir} has no config.json; point --workdir at a jaxllm run folder")
        config = config_lib.from_json((run_dir / "config.json").read_text())
        if args.data:
            data = pathlib.Path(args.data)
            config.mathqa.source = "local"
            if data.is_file():
                config.mathqa.test_split = str(data)
            else:
                config.mathqa.path = str(data)
        if args.split:
            config.mathqa.test_split = args.split
        if args.max_length is not None:
            config.mathqa.eval_max_length = args.max_length
        tokenizer = get_tokenizer(config.data.tokenizer, config.data.tokenizer_path)
        questions, report = mathqa.load_questions(config.mathqa, config.mathqa.test_split)
        train_questions = mathqa.shot_pool(config.mathqa) if args.shots else []  # the fine-tune stage's pool
        if args.max_questions:
            questions = questions[:args.max_questions]
        params, step = load_params(run_dir, config)
        mesh = sharding.make_mesh(min(config.train.num_devices, jax.device_count()))  # the run may have had more
        if config.mathqa.eval_batch_size % mesh.size:
            config.mathqa.eval_batch_size = -(-config.mathqa.eval_batch_size // mesh.size) * mesh.size
        model = models.build(config)
        result = run_mc(config, params, model, tokenizer, mesh, questions, train_questions, args.shots)
    except (DataError, TokenizerError, checkpoint_lib.CheckpointError, config_lib.ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    row = {"task": args.task, "split": config.mathqa.test_split, "step": step, **result, "parse": report.summary()}
    with open(run_dir / "eval.jsonl", "a") as file:
        file.write(json.dumps(row) + "\n")
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(run_dir / "tensorboard")) as tb:
        for name in ("acc", "acc_norm", "shots_mean"):
            tb.add_scalar(f"mathqa_{args.shots}shot/{name}", result[name], step)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()  # before anything runs: see jaxllm/hugepages.py
    sys.exit(main())
