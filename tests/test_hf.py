"""Hugging Face Llama import and export (jaxllm/hf.py) against transformers itself, on random tiny models."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxllm import generate as generate_lib  # noqa: E402
from jaxllm import hf, models  # noqa: E402

VOCAB = 101
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 512}
SHAPES = {  # the variants the issue names: MHA, GQA with 1 and 2 KV heads, tied/untied, llama3, theta 5e5
    "mha_untied": dict(num_key_value_heads=4),
    "gqa1_tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "gqa2_llama3": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=dict(LLAMA3),
                        max_position_embeddings=1024),
    "gqa2_head_dim": dict(num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5),
}


def hf_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    shape = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                 initializer_range=0.2)
    config = transformers.LlamaConfig(**{**shape, **overrides})
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a swapped norm weight shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def hf_logits(model, tokens_BxL: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens_BxL)).logits.float().numpy()


def jax_logits(config, params, tokens_BxL: np.ndarray) -> np.ndarray:
    return np.asarray(models.build(config).apply({"params": params}, jnp.asarray(tokens_BxL, jnp.int32)))


TOKENS_BxL = np.random.default_rng(0).integers(0, VOCAB, (2, 96))


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_import_gives_transformers_logits(tmp_path, name):
    model = hf_model(**SHAPES[name])
    model.save_pretrained(tmp_path)
    config, params = hf.load_pretrained(str(tmp_path))
    assert config.model.n_kv_head == SHAPES[name]["num_key_value_heads"]
    np.testing.assert_allclose(jax_logits(config, params, TOKENS_BxL), hf_logits(model, TOKENS_BxL), atol=1e-4, rtol=0)


def test_llama3_scaling_matters(tmp_path):
    """The llama3 test above would pass by accident if the scaling were ignored at these positions: it is not."""
    model = hf_model(**SHAPES["gqa2_llama3"])
    model.save_pretrained(tmp_path)
    config, params = hf.load_pretrained(str(tmp_path))
    config.model.rope_scaling = "none"
    assert np.abs(jax_logits(config, params, TOKENS_BxL) - hf_logits(model, TOKENS_BxL)).max() > 1e-3


@pytest.mark.parametrize("name", ["gqa1_tied", "gqa2_llama3"])
def test_export_round_trip(tmp_path, name):
    """HF -> jaxllm -> HF: the same weights bit for bit, and transformers loads the export to the same logits."""
    model = hf_model(**SHAPES[name])
    model.save_pretrained(tmp_path / "in")
    config, params = hf.load_pretrained(str(tmp_path / "in"))
    hf.save_pretrained(config, params, tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    original = model.state_dict()
    for key, value in again.state_dict().items():
        assert torch.equal(value, original[key]), key
    np.testing.assert_array_equal(hf_logits(again, TOKENS_BxL), hf_logits(model, TOKENS_BxL))


def test_export_of_a_jaxllm_model_gives_its_logits(tmp_path):
    """A model born in jaxllm (random init) exported and loaded by transformers gives jaxllm's logits."""
    import jax

    from jaxllm.config import default_config

    config = default_config()
    config.model.update(n_layer=2, n_embd=48, n_head=6, n_kv_head=2, vocab_size=VOCAB, sequence_length=128,
                        tie_embeddings=False)
    params = models.build(config).init(jax.random.key(3), jnp.zeros((1, 8), jnp.int32))["params"]
    hf.save_pretrained(config, params, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    np.testing.assert_allclose(hf_logits(model, TOKENS_BxL), jax_logits(config, params, TOKENS_BxL), atol=1e-4, rtol=0)


def test_bfloat16_export_and_sharded_bf16_import(tmp_path):
    """--dtype bfloat16 writes bf16 tensors; a sharded bf16 checkpoint imports exactly (bf16 -> f32 is exact)."""
    model = hf_model(**SHAPES["mha_untied"]).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "in", max_shard_size="20KB")
    assert (tmp_path / "in" / hf.INDEX).is_file()
    config, params = hf.load_pretrained(str(tmp_path / "in"))
    hf.save_pretrained(config, params, tmp_path / "out", dtype="bfloat16")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    for key, value in again.state_dict().items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, model.state_dict()[key]), key


def test_greedy_generation_matches_transformers(tmp_path):
    model = hf_model(**SHAPES["gqa2_llama3"])
    model.save_pretrained(tmp_path)
    config, params = hf.load_pretrained(str(tmp_path))
    prompt = TOKENS_BxL[:1, :7]
    with torch.no_grad():
        want = model.generate(torch.tensor(prompt), max_new_tokens=20, do_sample=False, min_new_tokens=20,
                              pad_token_id=0)[0, 7:].numpy()
    got = generate_lib.generate(models.build(config), params, prompt, max_new_tokens=20)
    np.testing.assert_array_equal(np.asarray(got)[0], want)


@pytest.mark.parametrize("field, value, named", [
    ("attention_bias", True, "attention_bias"),
    ("mlp_bias", True, "mlp_bias"),
    ("hidden_act", "gelu", "hidden_act"),
    ("sliding_window", 64, "sliding_window"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "linear"),
    ("rope_scaling", {"type": "yarn", "factor": 2.0}, "yarn"),
    ("model_type", "mistral", "mistral"),
])
def test_unsupported_fields_are_refused_by_name(tmp_path, field, value, named):
    model = hf_model(**SHAPES["mha_untied"])
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("rope_parameters", None) if field == "rope_scaling" else None
    raw[field] = value
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(hf.HFError, match=named):
        hf.load_pretrained(str(tmp_path))


def test_missing_files_and_offline_hub_are_one_sentence(tmp_path, monkeypatch):
    with pytest.raises(hf.HFError, match="no config.json"):
        hf.load_pretrained(str(tmp_path))
    model = hf_model(**SHAPES["mha_untied"])
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(hf.HFError, match="safetensors only"):
        hf.load_pretrained(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not safetensors")
    (tmp_path / "pytorch_model.bin").rename(tmp_path / "model.safetensors")
    with pytest.raises(hf.HFError, match="not a readable safetensors"):
        hf.load_pretrained(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hf.HFError, match="cannot download the Hub model nobody/no-such-model"):
        hf.load_pretrained("nobody/no-such-model")


def test_moe_runs_are_refused_for_export(tmp_path):  # gpt2 runs export as GPT2LMHeadModel: tests/test_hf_gpt2.py
    from jaxllm.config import default_config

    config = default_config()
    config.moe.n_experts = 4
    with pytest.raises(hf.HFError, match="mixture-of-experts"):
        hf.save_pretrained(config, {}, tmp_path)


def test_finetune_from_hf_trains_and_exports_again(tmp_path, monkeypatch):
    """finetune.init_from=hf:DIR fine-tunes an imported model on the synthetic MathQA (its shape comes from
    config.json, whatever configs/tiny.py says), and `jaxllm.export` hands it back to transformers with the
    fine-tuned weights' logits."""
    from jaxllm import export as export_lib
    from jaxllm import train as train_lib

    monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path / "cache"))
    model = hf_model(**dict(SHAPES["gqa2_llama3"], vocab_size=320))  # no tokenizer.json: the byte tokenizer stays
    model.save_pretrained(tmp_path / "in")
    rc = train_lib.main(["--config", "configs/tiny.py", "--workdir", str(tmp_path / "run"), "--config.stages=finetune",
                         f"--config.finetune.init_from=hf:{tmp_path / 'in'}", "--config.finetune.train.steps=3",
                         "--config.finetune.train.batch_size=4", "--config.finetune.train.eval_every=3",
                         "--config.finetune.train.checkpoint_every=3", "--config.finetune.train.progress=false",
                         "--config.finetune.train.num_devices=1", "--config.mathqa.synthetic_problems=40",
                         "--config.mathqa.eval_questions=4", "--config.mathqa.eval_shots=0",
                         "--config.mathqa.max_length=96", "--config.mathqa.eval_batch_size=20",
                         "--config.train.num_devices=1"])
    assert rc == 0
    saved = json.loads((tmp_path / "run" / "finetune" / "config.json").read_text())
    assert (saved["model"]["n_kv_head"], saved["model"]["rope_scaling"], saved["model"]["n_embd"]) == (2, "llama3", 32)
    assert export_lib.main(["--workdir", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "out")]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    config, params = hf.load_pretrained(str(tmp_path / "out"))
    assert not np.array_equal(params["blocks_0"]["mlp"]["w1"]["kernel"],
                              hf.load_pretrained(str(tmp_path / "in"))[1]["blocks_0"]["mlp"]["w1"]["kernel"])
    tokens_BxL = TOKENS_BxL % 257
    np.testing.assert_allclose(hf_logits(exported, tokens_BxL), jax_logits(config, params, tokens_BxL), atol=1e-4, rtol=0)
    # the same run as one GGUF file (the byte tokenizer inside): llama.cpp's reader gives back the same weights
    from jaxllm import gguf_io

    assert export_lib.main(["--workdir", str(tmp_path / "run"), "--format", "gguf", "--quant", "f32",
                            "--out", str(tmp_path / "model.gguf")]) == 0
    fields, gguf_params = gguf_io.read_gguf(tmp_path / "model.gguf")
    assert (fields["n_kv_head"], fields["rope_scaling"]) == (2, "llama3")
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        np.testing.assert_array_equal(leaf, functools.reduce(lambda tree, key: tree[key.key], path, gguf_params))


def test_eval_and_generate_take_an_imported_model(tmp_path, capsys, monkeypatch):
    """`jaxllm.eval --init_from hf:DIR` scores MathQA (both formats) and perplexity, `jaxllm.generate
    --init_from hf:DIR` decodes with the folder's tokenizer, and a non-import source is refused."""
    from jaxllm import eval as eval_lib
    from jaxllm.config import default_config
    from jaxllm.tokenizer import get_tokenizer

    monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path / "cache"))
    config = default_config()
    config.model.update(n_layer=2, n_embd=32, n_head=4, vocab_size=320, sequence_length=128)
    params = models.build(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    hf.save_pretrained(config, params, tmp_path / "m", tokenizer=get_tokenizer("byte"))
    (tmp_path / "doc.txt").write_text("a few words of text to score\n" * 20)
    for extra in (["--format", "jaxllm"], ["--format", "lm-eval"], ["--task", "perplexity", "--data", str(tmp_path / "doc.txt")]):
        assert eval_lib.main(["--init_from", f"hf:{tmp_path / 'm'}", "--shots", "0", "--max_questions", "4", *extra]) == 0
        row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert row["model"] == f"hf:{tmp_path / 'm'}"
        assert ("word_perplexity" in row) if "perplexity" in extra else (0 <= row["acc"] <= 1)
    assert generate_lib.main(["--init_from", f"hf:{tmp_path / 'm'}", "--prompt", "ab", "--max_new_tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("ab")
    assert eval_lib.main(["--init_from", str(tmp_path / "m")]) == 2
    assert "is not hf:FOLDER_OR_REPO_ID or gguf:FILE" in capsys.readouterr().err
