"""lm-eval-format MathQA and rolling perplexity (jaxllm/lmeval.py, jaxllm/eval.py), checked against
lm-evaluation-harness itself where it is installed (`pip install lm-eval`), against golden values taken from
it, and against brute-force forward passes of a tiny model."""

import dataclasses
import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import checkpoint as checkpoint_lib, config as config_lib, eval as eval_lib, lmeval, models, sharding
from jaxllm.data import synthetic
from jaxllm.tokenizer import ByteTokenizer

MATHQA_TEST = pathlib.Path(os.environ.get("JAXLLM_MATHQA", "/work/shared/data/mathqa")) / "test.json"

# Real rows of MathQA's test.json (by index) and made-up ones, with the choices lm-eval 0.4.13's
# `lm_eval.tasks.mathqa.utils.doc_to_choice` returns for them.
TRICKY = [
    # 82: the Python-list form: every choice keeps a quote, e keeps "']"
    ("['a ) 2 : 3', 'b ) 4 : 5', 'c ) 16 : 9', 'd ) 7 : 9', 'e ) 8 : 5']",
     ["2 : 3'", "4 : 5'", "16 : 9'", "7 : 9'", "8 : 5']"]),
    # 27: thousands commas have no space after them: kept
    ("a ) s . 19,800 , b ) s . 15,600 , c ) s . 16,500 , d ) s . 17,600 , e ) s . 17,900",
     ["s . 19,800", "s . 15,600", "s . 16,500", "s . 17,600", "s . 17,900"]),
    # 85: a doubled letter stays in the choice text
    ("a ) a ) 2 , b ) b ) 5 , c ) c ) 7 , d ) d ) 5 , e ) e ) 8", ["a ) 2", "b ) 5", "c ) 7", "d ) 5", "e ) 8"]),
    # 2192 and 550: "e ) of these", and doubling in only some options
    ("a ) a ) 96 , b ) b ) 108 , c ) c ) 110 , d ) d ) 78 , e ) of these",
     ["a ) 96", "b ) 108", "c ) 110", "d ) 78", "of these"]),
    ("a ) 3 , b ) 4.5 , c ) 4 , d ) d ) 12 , e ) e ) 5", ["3", "4.5", "4", "d ) 12", "e ) 5"]),
    # made up: a value holding ", " is cut at it (a's "2" is lost; e, anchored at the end, keeps it)
    ("a ) 1, 2 , b ) 3 , c ) 4 , d ) 5 , e ) 6, 7", ["1", "3", "4", "5", "6, 7"]),
    # made up: four options parse to four choices; a sixth stays inside e
    ("a ) x , b ) y , c ) z , e ) w", ["x", "y", "z", "w"]),
    ("a ) 1 , b ) 2 , c ) 3 , d ) 4 , e ) 5 , f ) 6", ["1", "2", "3", "4", "5 , f ) 6"]),
]


def harness():
    return pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (pip install lm-eval)")


def test_choices_parse_as_the_harness_parses_them():
    for options, expected in TRICKY:
        assert lmeval.doc_to_choice(options) == expected, options
    doc = lmeval.read_doc({"Problem": "p ?", "options": TRICKY[-2][0], "correct": "e"})
    assert doc.query == "Question: p ?\nAnswer:" and doc.gold == 4 and len(doc.choices) == 4  # gold past the choices


def test_choices_equal_the_harness_on_real_rows():
    harness()
    from lm_eval.tasks.mathqa.utils import doc_to_choice

    if not MATHQA_TEST.is_file():
        pytest.skip(f"{MATHQA_TEST} not here (set JAXLLM_MATHQA to a folder with MathQA's test.json)")
    rows = json.loads(MATHQA_TEST.read_text())
    picked = rows[:50] + [rows[i] for i in (82, 85, 550, 628, 2192, 2502)]  # 50 in order + the list/doubled forms
    for row in picked:
        assert lmeval.doc_to_choice(row["options"]) == doc_to_choice(row)
    for options, expected in TRICKY:
        assert doc_to_choice({"options": options}) == expected  # the golden values above are the harness's


def records(n: int, seed: int) -> list[dict]:
    """Synthetic MathQA records, with the tricky option strings mixed in."""
    out = synthetic.generate_problems(n, seed, held_out=False)
    for i, (options, _) in enumerate(TRICKY[:5]):
        out[2 * i + 1] = {**out[2 * i + 1], "options": options}
    return out


def harness_task(tmp_path, test_rows, train_rows, shots: int):
    """lm-eval's own `mathqa` task (its installed mathqa.yaml) on local rows, requests built with its seed."""
    harness()
    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    for name, rows in (("test", test_rows), ("train", train_rows)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_yaml(pathlib.Path(lm_eval.tasks.__file__).parent / "mathqa" / "mathqa.yaml")
    config.update(dataset_path="json", validation_split=None, dataset_kwargs={
        "data_files": {"test": str(tmp_path / "test.jsonl"), "train": str(tmp_path / "train.jsonl")},
        "cache_dir": str(tmp_path / "hf_cache")})
    task = ConfigurableTask(config=config)
    task.set_config(key="num_fewshot", value=shots)
    task.set_fewshot_seed(seed=1234)  # simple_evaluate's default fewshot_random_seed
    return task


def test_requests_equal_the_harness_requests(tmp_path):
    """Contexts (few-shot draws included) and continuations of every choice, as lm-eval builds them."""
    test_rows, train_rows = records(12, seed=3), records(40, seed=1)
    task = harness_task(tmp_path, test_rows, train_rows, shots=3)
    for limit in (None, 5):
        task.set_fewshot_seed(seed=1234)  # one run: the sampler's generator runs on across build_all_requests
        task.build_all_requests(limit=limit)
        theirs = {}
        for inst in task.instances:
            theirs.setdefault(inst.doc_id, []).append(inst.arguments)
        docs, contexts, _, _, skipped = lmeval.mathqa_requests(ByteTokenizer(), test_rows, train_rows, shots=3,
                                                               limit=limit or 0)
        assert skipped == {} and len(docs) == len(theirs) == (limit or 12)
        for i, (doc, context) in enumerate(zip(docs, contexts)):
            assert theirs[i] == [(context, " " + choice) for choice in doc.choices]
            assert context.count("Question:") == 4


def test_shot_draws_equal_the_harness_sampler():
    harness()
    from lm_eval.api.samplers import ContextSampler

    pool = [{"i": i} for i in range(97)]
    sampler = ContextSampler(pool, rnd=1234)
    ours = lmeval.fewshot_indices(30, len(pool), 5)
    assert [[d["i"] for d in sampler.sample(5)] for _ in range(30)] == ours


def test_context_and_continuation_are_split_as_the_harness_splits_them():
    """Trailing context spaces move to the continuation; the continuation is the whole text's ids past the
    context's; a BOS starts the context. Against the harness's own `_encode_pair` where installed."""

    class Words:  # a tokenizer whose tokens can span the context/continuation boundary
        vocab = {}

        def encode(self, text):
            import re

            return [self.vocab.setdefault(piece, len(self.vocab)) for piece in re.findall(r" ?\w+| +|[^\w ]", text)]

    words = Words()
    context_ids, conts = lmeval.encode_pairs(words, "Answer: ", ["12", " x"])
    assert context_ids == words.encode("Answer:")
    assert conts == [words.encode("Answer: 12")[2:], words.encode("Answer:  x")[2:]]
    assert conts[0] == words.encode(" 12")  # the moved space joined the number
    context_ids, conts = lmeval.encode_pairs(bos_bytes(), "Q:\nAnswer:", [" 3", " 40"])
    assert context_ids == [257] + list(b"Q:\nAnswer:") and conts == [list(b" 3"), list(b" 40")]
    if importlib_has("lm_eval"):
        from types import SimpleNamespace

        from lm_eval.api.model import TemplateLM

        lm = SimpleNamespace(tok_encode=words.encode, backend="causal")
        for context, continuation in (("Answer: ", "12"), ("Answer:", " 12"), ("a b  ", " c"), ("x\n\n", "y")):
            theirs = TemplateLM._encode_pair(lm, context, continuation)
            ctx, (cont,) = lmeval.encode_pairs(words, context, [continuation])
            assert (ctx, cont) == tuple(theirs), (context, continuation)


def bos_bytes():
    """The byte tokenizer with a BOS id (257), like a Hugging Face tokenizer that adds one."""
    return dataclasses.make_dataclass("BosBytes", [("bos_id", int, 257)], bases=(ByteTokenizer,), frozen=True)()


def importlib_has(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_acc_and_acc_norm_on_a_hand_made_table():
    """acc: argmax of the summed log-likelihood; acc_norm: per character (not byte) of the choice without its
    delimiter space; a gold index past the choices scores 0; ties go to the first; stderr with n - 1."""
    docs = [lmeval.MathQADoc("q", ("1", "100"), 1),          # ll: -2 vs -3   -> acc picks 0; norm -2 vs -1 -> 1
            lmeval.MathQADoc("q", ("ab", "π π"), 1),          # -4 vs -5.5     -> 0; -2 vs -1.83 (chars) -> 1
            lmeval.MathQADoc("q", ("x", "y"), 0),             # tie -1, -1     -> first (0) both
            lmeval.MathQADoc("q", ("x", "y", "z", "w"), 4)]   # gold past the four choices: 0 whatever
    lls = [np.array([-2.0, -3.0]), np.array([-4.0, -5.5]), np.array([-1.0, -1.0]), np.array([-1.0, -2, -3, -4])]
    acc, acc_norm = lmeval.mc_outcomes(lls, docs)
    assert acc.tolist() == [0, 0, 1, 0] and acc_norm.tolist() == [1, 1, 1, 0]
    # characters, not bytes: "π π" is 3 characters and 5 bytes; -1 vs -1.6 per character picks choice 0,
    # per byte (-1 vs -0.96) it would pick choice 1
    _, by_char = lmeval.mc_outcomes([np.array([-2.0, -4.8])], [lmeval.MathQADoc("q", ("ab", "π π"), 0)])
    assert by_char.tolist() == [1.0]
    metrics = lmeval.mc_metrics(lls, docs)
    assert metrics["acc"] == 0.25 and metrics["acc_norm"] == 0.75 and metrics["n"] == 4
    assert metrics["acc_stderr"] == pytest.approx(math.sqrt(0.25 * 0.75 * 4 / 3) / 2)
    assert metrics["acc_norm_stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 * 4 / 3) / 2)


def test_outcomes_equal_the_harness_process_results(tmp_path):
    test_rows, train_rows = records(12, seed=3), records(40, seed=1)
    task = harness_task(tmp_path, test_rows, train_rows, shots=0)
    from lm_eval.api.metrics import mean_stderr

    rng = np.random.default_rng(0)
    docs, _, _, _, _ = lmeval.mathqa_requests(ByteTokenizer(), test_rows, [], shots=0)
    lls = [np.round(rng.normal(-10, 3, len(doc.choices)), 1) for doc in docs]  # ties and near-ties happen
    acc, acc_norm = lmeval.mc_outcomes(lls, docs)
    for i, row in enumerate(test_rows):
        theirs = task.process_results(row, [(float(ll), False) for ll in lls[i]])
        assert (theirs["acc"], theirs["acc_norm"]) == (acc[i], acc_norm[i])
    assert lmeval.mean_stderr(acc) == pytest.approx(mean_stderr(list(acc)), rel=1e-12)


# ------------------------------------------------------------------------------ a tiny model, brute force


@pytest.fixture(scope="module")
def tiny():
    c = config_lib.default_config()
    c.model.n_layer, c.model.n_embd, c.model.n_head, c.model.n_kv_head = 2, 32, 4, 2
    c.model.vocab_size, c.model.init_std, c.model.sequence_length = 320, 0.1, 64
    model = models.build_model(c.model)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, params, c


def forward_logp(model, params, ids) -> np.ndarray:
    """float64 [len(ids), V]: log-probabilities of the next token after each of `ids`, one plain forward
    (right-padded to a multiple of 128 so that few shapes compile; a causal model ignores what follows)."""
    padded = np.zeros((1, -(-len(ids) // 128) * 128), np.int32)
    padded[0, :len(ids)] = ids
    logits = _forward(model, params, padded)[0, :len(ids)]
    return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), np.float64)


@jax.jit(static_argnums=0)
def _forward(model, params, ids_1xL):
    return model.apply({"params": params}, ids_1xL, deterministic=True)


def test_choice_loglikelihoods_equal_a_full_forward(tiny):
    """Both layouts (KV-cached llama, one row per option) give each " " + choice the summed log-probability
    a plain forward over context + choice gives, BOS first; and a cut context is cut as the harness cuts it."""
    model, params, _ = tiny
    bos = bos_bytes()
    test_rows, train_rows = records(12, seed=3)[:6], records(40, seed=1)
    docs, contexts, context_ids, option_ids, _ = lmeval.mathqa_requests(bos, test_rows, train_rows, shots=1)
    mesh = sharding.make_mesh(1)
    kwargs = dict(batch_size=10, pad_multiple=64, mesh=mesh)
    cached, cut_c = eval_lib.mc_loglikelihoods(eval_lib.make_cached_score_fn(model, mesh), params, context_ids,
                                               option_ids, max_length=512, **kwargs)
    plain, cut_p = eval_lib.mc_loglikelihoods(eval_lib.make_score_fn(model, mesh), params, context_ids, option_ids,
                                              max_length=512, **kwargs)
    assert not cut_c.any() and not cut_p.any()
    for i, doc in enumerate(docs):
        for j, choice in enumerate(doc.choices):
            ctx, cont = [257] + list(contexts[i].encode()), list((" " + choice).encode())
            logp = forward_logp(model, params, ctx + cont[:-1])
            expected = sum(logp[len(ctx) - 1 + t, token] for t, token in enumerate(cont))
            assert cached[i][j] == pytest.approx(expected, abs=2e-4) and plain[i][j] == pytest.approx(expected, abs=2e-4)
    # 120 tokens: every 1-shot context is cut; each row keeps its last 121 tokens, as (ctx + cont)[-(L + 1):]
    short, cut = eval_lib.mc_loglikelihoods(eval_lib.make_score_fn(model, mesh), params, context_ids[:2],
                                            option_ids[:2], max_length=120, **kwargs)
    assert cut.all()
    for i in range(2):
        for j, cont in enumerate(option_ids[i]):
            ids = (context_ids[i] + cont)[-121:]
            logp = forward_logp(model, params, ids[:-1])
            expected = sum(logp[len(ids) - len(cont) - 1 + t, token] for t, token in enumerate(cont))
            assert short[i][j] == pytest.approx(expected, abs=2e-4)


def test_rolling_windows_equal_the_harness_windows():
    harness()
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for n in (0, 1, 5, 15, 16, 17, 32, 33, 50):
        tokens = list(range(100, 100 + n))
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, prefix_token=7, max_seq_len=16,
                                                                               context_len=1)]
        # the harness's model call: inputs (context + continuation)[-(L + 1):][:-1], the last len(cont) scored
        theirs = [((ctx + cont)[-17:], len(cont)) for ctx, cont in theirs]
        assert lmeval.rolling_windows(tokens, 7, 16) == theirs, n


def test_perplexity_equals_a_token_by_token_loop(tiny):
    """Each token's log-probability given exactly the tokens its window shows (one forward per token), summed;
    the metrics from those sums; one compilation per batch shape."""
    model, params, _ = tiny
    tok, L = ByteTokenizer(), 16
    texts = ["", "short doc", "a longer document, with  spaces\nand a second line: naïve café"]
    mesh = sharding.make_mesh(1)
    score = eval_lib.make_score_fn(model, mesh)
    result = eval_lib.evaluate_perplexity(score, params, tok, texts, max_length=L, batch_size=3, pad_multiple=8,
                                          mesh=mesh)
    total, tokens = 0.0, 0
    for text in texts:
        seq = [tok.eot_id] + tok.encode(text)
        n = len(seq) - 1
        for t in range(1, n + 1):
            window_end = min(-(-t // L) * L, n)  # the last target of token t's window
            start = max(0, window_end - L)       # the last window is filled back to L inputs
            total += forward_logp(model, params, seq[start:t])[-1, seq[t]]
        tokens += n
    assert result["loglikelihood"] == pytest.approx(total, abs=1e-3)
    n_bytes, words = 0 + 9 + 63, 1 + 2 + 11
    assert (result["documents"], result["tokens"], result["bytes"], result["words"]) == (3, tokens, n_bytes, words)
    assert result["word_perplexity"] == pytest.approx(math.exp(-total / words), rel=1e-6)
    assert result["byte_perplexity"] == pytest.approx(math.exp(-total / n_bytes), rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(-total / n_bytes / math.log(2), rel=1e-6)
    assert result["token_perplexity"] == pytest.approx(math.exp(-total / tokens), rel=1e-6)
    assert result["windows"] == 0 + 1 + 4  # 9 tokens: one window; 63 tokens: 16 x 3 + 15
    assert score._cache_size() == 1  # five windows, two batches, one shape [3, 16]


def hf_byte_tokenizer(with_bos: bool):
    """A transformers tokenizer that encodes text to its UTF-8 bytes (ids 0-255), end-of-text 256, and with
    `with_bos` a BOS (257) it puts in front of every encoding, as Llama's tokenizers do."""
    import transformers
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab.update({"<|endoftext|>": 256, "<s>": 257})
    tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<s>"])
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 257)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                bos_token="<s>" if with_bos else None)


@pytest.mark.slow  # ~25 s: torch, transformers and two HFLMs
def test_loglikelihoods_equal_lm_eval_on_the_exported_model(tiny, tmp_path):
    """End to end against the real thing: lm-eval's HFLM on the same model exported to transformers
    (jaxllm/hf.py) gives every MathQA request (2 shots, with and without a BOS) and every rolling
    perplexity document the log-likelihood jaxllm's scorers give."""
    harness()
    transformers = pytest.importorskip("transformers")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from jaxllm import hf

    model, params, config = tiny
    hf.save_pretrained(config, params, tmp_path / "model")
    torch_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "model", dtype="float32")
    mesh = sharding.make_mesh(1)
    test_rows, train_rows = records(12, seed=3), records(40, seed=1)
    task = harness_task(tmp_path, test_rows, train_rows, shots=2)
    task.build_all_requests()
    for with_bos, tokenizer in ((False, ByteTokenizer()), (True, bos_bytes())):
        lm = HFLM(pretrained=torch_model, tokenizer=hf_byte_tokenizer(with_bos), batch_size=8, max_length=512,
                  device="cpu")
        theirs = {}
        for inst, (ll, _) in zip(task.instances, lm.loglikelihood(task.instances, disable_tqdm=True)):
            theirs.setdefault(inst.doc_id, []).append(ll)
        _, _, context_ids, option_ids, _ = lmeval.mathqa_requests(tokenizer, test_rows, train_rows, shots=2)
        assert (context_ids[0][0] == 257) == with_bos
        for score in (eval_lib.make_cached_score_fn(model, mesh), eval_lib.make_score_fn(model, mesh)):
            lls, _ = eval_lib.mc_loglikelihoods(score, params, context_ids, option_ids, max_length=512, batch_size=10,
                                                pad_multiple=64, mesh=mesh)
            for i in range(len(test_rows)):
                np.testing.assert_allclose(lls[i], theirs[i], atol=1e-4, rtol=1e-5)
    # perplexity: their rolling windows of 16 tokens, EOT-prefixed (this tokenizer has no BOS)
    texts = ["", "short doc", "a longer document, with  spaces\nand a second line: naïve café " * 3]
    lm = HFLM(pretrained=torch_model, tokenizer=hf_byte_tokenizer(False), batch_size=8, max_length=16, device="cpu")
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0) for text in texts]
    theirs = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    score = eval_lib.make_score_fn(model, mesh)
    for text, ll in zip(texts, theirs):
        ours = eval_lib.evaluate_perplexity(score, params, ByteTokenizer(), [text], max_length=16, batch_size=2,
                                            pad_multiple=8, mesh=mesh)
        assert ours["loglikelihood"] == pytest.approx(ll, abs=1e-3)


def test_word_and_byte_counts():
    assert [lmeval.count_words(t) for t in ("", "a", " a b", "a  b\n", "x\ty\nz")] == [1, 1, 3, 3, 3]
    assert [lmeval.count_bytes(t) for t in ("", "abc", "naïve", "π")] == [0, 3, 6, 2]


def test_perplexity_metrics_equal_the_harness_aggregations():
    harness()
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity

    texts, lls = ["one two", "three  four five\n", ""], [-12.5, -30.25, 0.0]
    ours = lmeval.perplexity_metrics(lls, texts, [7, 17, 0])
    words = [(ll, lmeval.count_words(t)) for ll, t in zip(lls, texts)]
    n_bytes = [(ll, lmeval.count_bytes(t)) for ll, t in zip(lls, texts)]
    assert ours["word_perplexity"] == pytest.approx(weighted_perplexity(words), rel=1e-12)
    assert ours["byte_perplexity"] == pytest.approx(weighted_perplexity(n_bytes), rel=1e-12)
    assert ours["bits_per_byte"] == pytest.approx(bits_per_byte(n_bytes), rel=1e-12)


def test_read_texts(tmp_path):
    (tmp_path / "a.txt").write_text("whole file\nis one document\n")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\nnot json\n{"text": 5}\n\n{"text": "two"}\n')
    texts, skipped = lmeval.read_texts(str(tmp_path))
    assert texts == ["whole file\nis one document\n", "one", "two"] and skipped == {"broken_line": 1, "no_text": 1}
    with pytest.raises(lmeval.DataError, match="does not exist"):
        lmeval.read_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "c.csv").write_text("text\nx\n")
    with pytest.raises(lmeval.DataError, match="is not a .txt, .jsonl or .parquet file"):
        lmeval.read_texts(str(tmp_path / "c.csv"))


# -------------------------------------------------------------------------------------------------- CLI


def tiny_run(tmp_path) -> pathlib.Path:
    """A run folder: a one-layer llama (byte tokenizer, synthetic MathQA) with a checkpoint of fresh params."""
    c = config_lib.default_config()
    c.model.n_layer, c.model.n_embd, c.model.n_head, c.model.vocab_size, c.model.sequence_length = 1, 32, 2, 320, 32
    c.data.tokenizer = "byte"
    c.mathqa.synthetic_problems, c.mathqa.eval_max_length, c.mathqa.eval_batch_size = 40, 512, 10
    c.train.num_devices = 1
    config_lib.validate(c)
    run = tmp_path / "run"
    params = models.build_model(c.model).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    ckpt = checkpoint_lib.Checkpointer(run / "checkpoints")
    ckpt.save(3, {"params": params}, {"model_shape": checkpoint_lib.shape_signature(c.model)})
    ckpt.close()
    (run / "config.json").write_text(config_lib.to_json(c))
    return run


def test_cli_lm_eval_format_and_perplexity(tmp_path, capsys):
    run = tiny_run(tmp_path)
    assert eval_lib.main(["--workdir", str(run), "--format", "lm-eval", "--shots", "1", "--max_questions", "3"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["format"] == "lm-eval" and row["task"] == "mathqa" and row["n"] == 3 and row["shots"] == 1
    assert row["step"] == 3 and row["fewshot_split"] == "train" and row["truncated"] == 0
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(row)
    (tmp_path / "doc.txt").write_text("a small document to score, " * 4)
    assert eval_lib.main(["--workdir", str(run), "--task", "perplexity", "--data", str(tmp_path / "doc.txt")]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["format"] == "lm-eval" and row["tokens"] == 108 and row["windows"] == 4 and row["max_length"] == 32
    assert row["bits_per_byte"] == pytest.approx(-row["loglikelihood"] / 108 / math.log(2))
    assert eval_lib.main(["--workdir", str(run), "--shots", "0", "--max_questions", "2"]) == 0
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [(r["task"], r["format"]) for r in rows] == [("mathqa", "lm-eval"), ("perplexity", "lm-eval"),
                                                        ("mathqa", "jaxllm")]
    assert eval_lib.main(["--workdir", str(run), "--task", "perplexity", "--data", str(tmp_path / "none.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_lib.main(["--workdir", str(run), "--task", "perplexity"])
