"""A BOS where the model expects one: a tokenizer with a `bos_id` (Llama 3's <|begin_of_text|>) puts it first in
every MathQA fine-tune example and every jaxllm-format scored context, never cuts it off, never puts loss on it;
a tokenizer without one (byte, gpt2, SmolLM2) gives exactly what it gave before.

The BOS tokenizer is jaxllm's byte tokenizer written as a Hugging Face tokenizer.json with a "<s>" added and a
TemplateProcessing post-processor that puts it first, as Llama 3's tokenizer.json does; transformers confirms it
adds "<s>" first. Scores are checked against a plain full forward of [BOS] + context + option."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from jaxllm import config as config_lib, eval as eval_lib, models, sharding  # noqa: E402
from jaxllm.data import mathqa  # noqa: E402
from jaxllm.tokenizer import ByteTokenizer, get_tokenizer, save_hf_tokenizer  # noqa: E402

FT_MAX = 160  # fine-tune max_length: plain prompts fit, the long ones are cut from the left
EVAL_MAX = 400  # scored context + option: two of three shots fit a plain prompt, a long prompt is cut
BOS_TEXT = "<s>"


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory):
    """The byte tokenizer as an "hf" tokenizer whose post-processor puts "<s>" (id 257 < the models' 320) first."""
    folder = save_hf_tokenizer(ByteTokenizer(), tmp_path_factory.mktemp("bos_tokenizer"))
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([tokenizers.AddedToken(BOS_TEXT, special=True, normalized=False)])
    bos = tok.token_to_id(BOS_TEXT)
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{BOS_TEXT} $A", pair=f"{BOS_TEXT} $A {BOS_TEXT} $B:1", special_tokens=[(BOS_TEXT, bos)])
    tok.save(str(folder / "tokenizer.json"))
    hf = get_tokenizer("hf", str(folder))
    auto = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert hf.bos_id == bos == 257 == auto("Answer:")["input_ids"][0]
    assert hf.eot_id == 256 and hf.encode("Answer: é") == ByteTokenizer().encode("Answer: é")
    return hf


def make_questions(n: int, tag: str) -> list[mathqa.Question]:
    """Questions "tag i" with five short options; every third one has a problem long enough (400 bytes) that
    its prompt is cut in both the fine-tune (FT_MAX) and the scored contexts (EVAL_MAX)."""
    return [mathqa.Question(problem=f"{tag} {i}" + (" long" * 80 if i % 3 == 2 else ""),
                            options=tuple(f"{tag[0]}{i}{j}" * (j + 1) for j in range(5)), answer=i % 5,
                            rationale=f"because {i} is {i}")
            for i in range(n)]


def finetune_splits() -> dict[str, list[mathqa.Question]]:
    """Train (with one question whose answer alone is longer than FT_MAX) and validation questions."""
    huge = mathqa.Question(problem="huge", options=("y" * 300, "1", "2", "3", "4"), answer=0)
    return {"train": make_questions(8, "train") + [huge], "val": make_questions(4, "val")}


def tiny_model(name: str):
    """A random 2-layer `name` model with 320 ids (the BOS 257 among them) and its params."""
    c = config_lib.default_config()
    c.model.name, c.model.n_layer, c.model.n_embd, c.model.n_head = name, 2, 32, 4
    c.model.n_kv_head = 2 if name == "llama" else 0
    c.model.vocab_size, c.model.init_std, c.model.sequence_length = 320, 0.1, 512
    model = models.build_model(c.model)
    return model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]


# ---------------------------------------------------------------------------------------------- fine-tune


def test_finetune_examples_start_with_bos_and_never_learn_it(bos_tokenizer):
    tok, byte, bos = bos_tokenizer, ByteTokenizer(), bos_tokenizer.bos_id
    splits = finetune_splits()
    data = mathqa.FinetuneData(splits, tok, max_length=FT_MAX, pad_multiple=16, rationale=True)
    cut = 0
    for (ids, mask), q in zip(data.train + data.val, splits["train"] + splits["val"]):
        prompt, target = mathqa.format_prompt(q), mathqa.format_target(q, rationale=True)
        whole = byte.encode(prompt) + byte.encode(target) + [byte.eot_id]  # UTF-8, what the text is
        assert ids[0] == bos and mask[0] == 0 and bos not in ids[1:].tolist()
        assert len(ids) <= FT_MAX + 1
        if len(whole) + 1 <= FT_MAX + 1:  # fits with its BOS: nothing cut
            assert ids.tolist() == [bos] + whole
            assert mask.tolist() == [0.0] * (1 + len(prompt)) + [1.0] * (len(target) + 1)
        else:  # cut from the left: the BOS stays, the oldest tokens go, the answer (and EOT) is learned whole
            cut += 1
            assert ids.tolist() == [bos] + whole[-FT_MAX:]
            n_target = min(len(target) + 1, FT_MAX)
            assert mask.tolist() == [0.0] * (FT_MAX - n_target + 1) + [1.0] * n_target
    assert cut == 4  # every third question of train and val, and the huge answer

    # 21 tokens fit max_length 20 exactly without a BOS; with it, the oldest prompt token makes way
    plain_ids, _ = mathqa.tokenize_example(byte, "x" * 13 + "y", " b ) 5", max_length=20)
    ids, mask = mathqa.tokenize_example(tok, "x" * 13 + "y", " b ) 5", max_length=20)
    assert len(plain_ids) == len(ids) == 21 and ids[0] == bos and ids[1:].tolist() == plain_ids[1:].tolist()
    assert mask.tolist() == [0.0] * 14 + [1.0] * 7

    batches = [data.train_batch(seed=0, step=s, batch_size=3, grad_accum=2) for s in range(4)]
    batches += data.val_batches(batch_size=3)
    for batch in batches:
        inputs, targets, weights = (batch[k].reshape(-1, batch[k].shape[-1]) for k in ("inputs", "targets", "weights"))
        real = weights.sum(axis=1) > 0
        assert real.sum() >= 1 and (inputs[real, 0] == bos).all()
        assert not (targets[weights > 0] == bos).any()  # no loss ever on predicting the BOS


def test_finetune_examples_with_bos_are_the_byte_ones_behind_it(bos_tokenizer):
    """Where nothing is cut, the BOS tokenizer's example is the byte tokenizer's with one BOS (mask 0) in front."""
    splits = finetune_splits()
    with_bos = mathqa.FinetuneData(splits, bos_tokenizer, max_length=FT_MAX, pad_multiple=16)
    without = mathqa.FinetuneData(splits, ByteTokenizer(), max_length=FT_MAX, pad_multiple=16)
    uncut = 0
    for (ids, mask), (plain_ids, plain_mask) in zip(with_bos.train + with_bos.val, without.train + without.val):
        assert plain_ids[0] != bos_tokenizer.bos_id  # the byte tokenizer forces no first token
        if len(plain_ids) <= FT_MAX:
            uncut += 1
            assert ids.tolist() == [bos_tokenizer.bos_id] + plain_ids.tolist()
            assert mask.tolist() == [0.0] + plain_mask.tolist()
        else:
            assert len(ids) == len(plain_ids) == FT_MAX + 1  # the BOS takes the place of one prompt token
    assert uncut == 9


# ---------------------------------------------------------------------------------------------- scoring


def test_shot_budget_counts_the_bos(bos_tokenizer):
    """A prompt that fills the budget exactly without a BOS needs one token more with it (cut_N marks it)."""
    pool, tests = make_questions(6, "pool"), make_questions(2, "test")
    prompt = len(mathqa.format_prompt(tests[0]))
    longest = max(len(mathqa.format_choice(q, o)) for q in tests for o in range(5))
    room = -(-longest // 8) * 8
    _, _, shots_N, cut_N = eval_lib.mc_contexts(ByteTokenizer(), tests[:1], pool, shots=2, seed=0,
                                                max_length=prompt + room)
    assert shots_N.tolist() == [0] and not cut_N.any()
    _, _, shots_N, cut_N = eval_lib.mc_contexts(bos_tokenizer, tests[:1], pool, shots=2, seed=0,
                                                max_length=prompt + room)
    assert shots_N.tolist() == [0] and cut_N.all()
    _, _, shots_N, cut_N = eval_lib.mc_contexts(bos_tokenizer, tests[:1], pool, shots=2, seed=0,
                                                max_length=prompt + room + 1)
    assert shots_N.tolist() == [0] and not cut_N.any()


def recording(score_fn, fed: list):
    """`score_fn`, also appending each call's arrays (host copies) to `fed`; keeps its `cached` mark."""
    def wrapped(params, *arrays):
        fed.append([np.asarray(a) for arr in arrays for a in (arr.values() if isinstance(arr, dict) else [arr])])
        return score_fn(params, *arrays)

    if getattr(score_fn, "cached", False):
        wrapped.cached = True
    return wrapped


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_scores_are_full_forwards_of_bos_context_option(bos_tokenizer, name):
    """Both scorers (llama: one cached context per question; gpt2: one row per option) score [BOS] + context +
    option: equal to a plain forward of exactly that, the BOS kept also when a long prompt is cut."""
    tok, bos = bos_tokenizer, bos_tokenizer.bos_id
    model, params = tiny_model(name)
    mesh = sharding.make_mesh(1)
    pool, tests = make_questions(12, "pool"), make_questions(6, "test")
    contexts, continuations, shots_N, cut_N = eval_lib.mc_contexts(tok, tests, pool, shots=3, seed=0,
                                                                   max_length=EVAL_MAX)
    # the long prompts are cut; the others keep some shots but not all three
    assert cut_N.tolist() == [i % 3 == 2 for i in range(6)] and shots_N.max() >= 1 and (shots_N < 3).all()
    score_fn = eval_lib.mc_score_fn(model, mesh)
    cached = getattr(score_fn, "cached", False)
    assert cached == (name == "llama")
    fed = []
    scores_Nx5 = eval_lib.mc_scores(recording(score_fn, fed), params, tok, contexts, continuations,
                                    max_length=EVAL_MAX, batch_size=10, pad_multiple=0, mesh=mesh)  # one shape

    # What the model saw first: the BOS at each real context's first position.
    for arrays in fed:
        if cached:
            context, start, _, weights = arrays
            real = weights.reshape(len(start), -1).sum(axis=1) > 0
            assert (context[np.arange(len(start)), start][real] == bos).all()
        else:
            inputs, _, weights = arrays
            real = weights.sum(axis=1) > 0
            assert (inputs[real, 0] == bos).all()

    # The brute force: each [BOS] + context + option in one plain forward (right padding changes no causal logit).
    option_room = -(-max(len(tok.encode(t)) for row in continuations for t in row) // 8) * 8
    rows, spans = [], []
    for i, (context, row) in enumerate(zip(contexts, continuations)):
        context_ids = tok.encode(context)
        for option in row:
            option_ids = tok.encode(option)
            # Room for context tokens besides the BOS: all of them unless cut, then the newest that fit
            # (cached: the context columns, EVAL_MAX - option_room; plain: EVAL_MAX + 1 less the option).
            room = (EVAL_MAX - option_room if cached else EVAL_MAX + 1 - len(option_ids)) - 1
            assert (len(context_ids) > room) == cut_N[i]
            ids = [bos] + context_ids[-room:] + option_ids
            rows.append(ids)
            spans.append((len(ids) - len(option_ids), len(ids)))
    tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for r, ids in enumerate(rows):
        tokens[r, :len(ids)] = ids
    logits = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logp = np.asarray(logp, np.float64)
    expected = [sum(logp[r, t - 1, tokens[r, t]] for t in range(a, b)) for r, (a, b) in enumerate(spans)]
    np.testing.assert_allclose(scores_Nx5.reshape(-1), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- no BOS: as before


def byte_digest() -> str:
    """sha256 of everything the byte tokenizer (no BOS) makes of `finetune_splits` and the scoring questions:
    fine-tune examples and batches, the scored contexts, and every array both scorers are fed."""
    tok, h = ByteTokenizer(), hashlib.sha256()

    def add(value):
        if isinstance(value, str):
            h.update(value.encode("utf-8"))
        else:
            a = np.asarray(value)
            h.update(f"{a.shape}{a.dtype}".encode())
            h.update(np.ascontiguousarray(a).tobytes())

    data = mathqa.FinetuneData(finetune_splits(), tok, max_length=FT_MAX, pad_multiple=16, rationale=True)
    for ids, mask in data.train + data.val:
        add(ids), add(mask)
    for step in range(3):
        for array in data.train_batch(seed=0, step=step, batch_size=2, grad_accum=2).values():
            add(array)
    for batch in data.val_batches(batch_size=3):
        for array in batch.values():
            add(array)
    pool, tests = make_questions(12, "pool"), make_questions(6, "test")
    contexts, continuations, shots_N, cut_N = eval_lib.mc_contexts(tok, tests, pool, shots=3, seed=0,
                                                                   max_length=EVAL_MAX)
    for text in contexts + [t for row in continuations for t in row]:
        add(text)
    add(shots_N), add(cut_N)
    mesh = sharding.make_mesh(1)
    for cached in (False, True):
        fed = []

        def fake_score(params, *arrays):  # records what a scorer is fed; every option scores 0
            fed.append([np.asarray(a) for arr in arrays for a in (arr.values() if isinstance(arr, dict) else [arr])])
            return np.zeros(len(fed[-1][0]) * (1 if not cached else 5), np.float32)

        if cached:
            fake_score.cached = True
        result = eval_lib.evaluate_mc(fake_score, None, tok, tests, pool, shots=3, seed=0, max_length=EVAL_MAX,
                                      batch_size=10, pad_multiple=16, mesh=mesh)
        add(repr(sorted(result.items())))
        for arrays in fed:
            for array in arrays:
                add(array)
    return h.hexdigest()


# byte_digest() as computed on main before BOS handling existed (commit d03c92a).
BYTE_DIGEST = "14fcfbfd3d09ac3e3d452bd66c4b265abecb863c1ed7db3eb7fb1848801b9d3b"


def test_without_bos_everything_is_as_before():
    assert ByteTokenizer().bos_id is None
    assert byte_digest() == BYTE_DIGEST
