"""jaxllm's GPT-2 baseline exported as a transformers GPT2LMHeadModel (jaxllm/hf.py), checked against
transformers itself on random tiny models: logits, greedy decoding, bf16, and `python -m jaxllm.export`."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxllm import generate as generate_lib  # noqa: E402
from jaxllm import hf, models  # noqa: E402
from jaxllm.config import default_config  # noqa: E402

VOCAB, POSITIONS = 101, 64
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gpt2_model(tie: bool, seed: int = 0):
    """(config, float32 params) of a random tiny jaxllm gpt2: init_std 0.2 so the logits are O(1), every
    LayerNorm scale drawn from [0.5, 1.5] so a swapped or dropped norm weight shows, an MLP width that is
    not 4 * D so n_inner must be right, and an eps far from transformers' default."""
    config = default_config()
    config.model.update(name="gpt2", n_layer=2, n_embd=32, n_head=4, mlp_hidden=80, vocab_size=VOCAB,
                        sequence_length=POSITIONS, tie_embeddings=tie, init_std=0.2, norm_eps=1e-3)
    params = models.build(config).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    rng = np.random.default_rng(seed)

    def perturb(path, leaf):
        if path[-1].key == "scale":
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return np.asarray(leaf)

    return config, jax.tree_util.tree_map_with_path(perturb, params)


def hf_logits(model, tokens_BxL: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens_BxL)).logits.float().numpy()


def jax_logits(config, params, tokens_BxL: np.ndarray) -> np.ndarray:
    return np.asarray(models.build(config).apply({"params": params}, jnp.asarray(tokens_BxL, jnp.int32)))


TOKENS_BxL = np.random.default_rng(0).integers(0, VOCAB, (2, POSITIONS))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_export_gives_jaxllm_logits(tmp_path, tie):
    """transformers' GPT2LMHeadModel of the export gives jaxllm's float32 logits at every learned position."""
    config, params = gpt2_model(tie)
    hf.save_pretrained(config, params, tmp_path)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    model.eval()
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert model.config.tie_word_embeddings is tie and model.config.n_inner == 80
    assert ("lm_head.weight" in hf.read_tensors(tmp_path)) is not tie
    if not tie:  # an untied head really is its own matrix in transformers
        assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    np.testing.assert_allclose(hf_logits(model, TOKENS_BxL), jax_logits(config, params, TOKENS_BxL), atol=1e-4, rtol=0)


@pytest.mark.parametrize("field, value", [("activation_function", "gelu_new"), ("layer_norm_epsilon", 1e-5),
                                          ("scale_attn_by_inverse_layer_idx", True)])
def test_the_logits_test_can_fail(tmp_path, field, value):
    """The test above would catch a wrong GELU (tanh), a wrong eps or a per-layer attention scale: each one
    moves transformers' logits by more than its 1e-4."""
    config, params = gpt2_model(tie=False)
    hf.save_pretrained(config, params, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw[field] = value
    (tmp_path / "config.json").write_text(json.dumps(raw))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert np.abs(hf_logits(model, TOKENS_BxL) - jax_logits(config, params, TOKENS_BxL)).max() > 1e-4


def test_bfloat16_export_loads(tmp_path):
    """--dtype bfloat16 writes bf16 tensors, each jaxllm's float32 weight rounded, that transformers loads and
    runs to logits near jaxllm's."""
    config, params = gpt2_model(tie=False, seed=1)
    hf.save_pretrained(config, params, tmp_path, dtype="bfloat16")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    state = model.state_dict()
    assert all(value.dtype == torch.bfloat16 for value in state.values())
    want = torch.tensor(np.asarray(params["blocks_1"]["mlp"]["fc"]["kernel"])).to(torch.bfloat16)
    assert torch.equal(state["transformer.h.1.mlp.c_fc.weight"], want)
    scale = np.abs(jax_logits(config, params, TOKENS_BxL)).max()
    np.testing.assert_allclose(hf_logits(model, TOKENS_BxL), jax_logits(config, params, TOKENS_BxL),
                               atol=0.1 * scale, rtol=0)


def test_greedy_generation_matches_jaxllm(tmp_path):
    config, params = gpt2_model(tie=True, seed=2)
    hf.save_pretrained(config, params, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt_1xP = TOKENS_BxL[:1, :7]
    with torch.no_grad():
        want = model.generate(torch.tensor(prompt_1xP), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                              pad_token_id=0)[0, 7:].numpy()
    got = generate_lib.generate(models.build(config), params, prompt_1xP, max_new_tokens=10)
    np.testing.assert_array_equal(np.asarray(got)[0], want)


def test_gpt2_import_and_moe_export_are_refused(tmp_path):
    """Reading a GPT2LMHeadModel back is refused by model_type (jaxllm's gpt2 has no biases for OpenAI's);
    a mixture-of-experts run is not exportable."""
    config, params = gpt2_model(tie=True)
    hf.save_pretrained(config, params, tmp_path)
    with pytest.raises(hf.HFError, match="jaxllm imports LlamaForCausalLM only"):
        hf.load_pretrained(str(tmp_path))
    config.model.name, config.moe.n_experts = "llama", 4
    with pytest.raises(hf.HFError, match="mixture-of-experts"):
        hf.save_pretrained(config, {}, tmp_path / "moe")


def test_export_cli_on_a_gpt2_run(tmp_path, monkeypatch, capsys):
    """A 2-step gpt2 pretraining run (configs/tiny.py, byte tokenizer) leaves `python -m jaxllm.export` as a
    GPT2LMHeadModel folder with the run's tokenizer and its checkpoint's logits; --format gguf is refused in
    one sentence."""
    from jaxllm import export as export_lib
    from jaxllm import hardware
    from jaxllm import train as train_lib
    from jaxllm.generate import load_params

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "measure_matmul_flops", lambda *args, **kwargs: 1e12)  # MFU's 2 s CPU benchmark
    run = tmp_path / "run"
    assert train_lib.main(["--config", "configs/tiny.py", "--workdir", str(run), "--config.stages=pretrain",
                           "--config.model.name=gpt2", "--config.model.n_layer=1", "--config.model.n_embd=32",
                           "--config.model.sequence_length=64", "--config.model.tie_embeddings=false",
                           "--config.data.synthetic_documents=200", f"--config.data.cache_dir={tmp_path / 'data'}",
                           "--config.train.steps=2", "--config.train.batch_size=2", "--config.train.eval_every=2",
                           "--config.train.eval_batches=1", "--config.train.full_eval_at_end=false",
                           "--config.train.checkpoint_every=2",
                           "--config.train.progress=false", "--config.train.num_devices=1"]) == 0
    capsys.readouterr()
    assert export_lib.main(["--workdir", str(run), "--format", "hf", "--out", str(tmp_path / "out")]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (row["format"], row["step"]) == ("hf", 2)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (model.config.model_type, model.config.n_positions, model.config.eos_token_id) == ("gpt2", 64, 256)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.decode(tokenizer("2 + 3 = 5", add_special_tokens=False)["input_ids"]) == "2 + 3 = 5"
    stage = run / "pretrain" if (run / "pretrain").is_dir() else run
    config = export_lib.config_lib.from_json((stage / "config.json").read_text())
    params, _ = load_params(stage, config)
    tokens_BxL = TOKENS_BxL % 257
    np.testing.assert_allclose(hf_logits(model, tokens_BxL), jax_logits(config, params, tokens_BxL), atol=1e-4, rtol=0)
    assert export_lib.main(["--workdir", str(run), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert "GGUF for llama models only" in err and "--format hf" in err and "Traceback" not in err
    assert not (tmp_path / "m.gguf").exists()
