"""Hugging Face checkpoints in and out: `load_pretrained(path_or_repo)` (Llama) and `save_pretrained(...)`
(Llama, and jaxllm's GPT-2 baseline as a GPT2LMHeadModel).

A `LlamaForCausalLM` folder (config.json + model.safetensors, or shards named by
model.safetensors.index.json; float32, bfloat16 or float16) becomes a full jaxllm config and a float32
param tree, so `models.build(config).apply({"params": params}, tokens_BxL)` gives the same logits as
transformers; `save_pretrained` writes the reverse. Supported: Llama 2, Llama 3/3.1/3.2 (rope_theta,
rope scaling of type llama3), SmolLM/SmolLM2, TinyLlama: grouped-query attention, tied or untied
embeddings, any head_dim, rms_norm_eps and vocabulary size. Anything else (biases, other rope types,
sliding windows, other activations) is refused with one sentence naming the field.

The rotary convention differs: transformers rotates the two halves of each head (i, i + K/2), jaxllm (like
the reference and llama.cpp) rotates adjacent pairs (2i, 2i + 1). The rows of every q and k projection are
permuted within each head on the way in (`_halves_to_pairs`) and back on the way out: q . k is unchanged
because both sides are permuted alike, and the round trip is the identity, bit for bit.

A gpt2-baseline run leaves as a `GPT2LMHeadModel` folder (`save_pretrained` only; importing one is
refused by model_type, since OpenAI's GPT-2 has biases jaxllm's baseline has no place for). The maths are
the same: learned positions (wpe), pre-LayerNorm blocks, 1/sqrt(head_dim) attention, exact-erf GELU
("gelu" in transformers' ACT2FN; "gelu_new" would be the tanh approximation), tied or untied head. jaxllm's
LayerNorms, attention and MLP are bias-free: their transformers biases are written as zeros. transformers'
Conv1D weights are [in, out], jaxllm's kernels too, so they go across untransposed, q, k and v
concatenated on the out axis of c_attn.

Weights are read and written with the `safetensors` package (no pickle, no torch). A Hub repo id is
downloaded with `huggingface_hub` when the network is there; offline, a repo that is not in the local cache
is one clear error.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxllm import config as config_lib
from jaxllm.config import ConfigError, llama_incompatible_options
from jaxllm.models import mlp_hidden

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SAVE_DTYPES = ("float32", "bfloat16", "float16")
# config.json fields whose non-default values would change the model's maths: (field, what jaxllm needs).
_MUST_BE = (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu"), ("sliding_window", None),
            ("use_sliding_window", False))


class HFError(ConfigError):
    """A Hugging Face checkpoint cannot be read or written; the message says what is wrong and what to do."""


def resolve(path_or_repo: str) -> pathlib.Path:
    """The local folder of `path_or_repo`: the folder itself, or a Hub repo id's snapshot (downloaded when
    the network is there: config, safetensors and tokenizer files only)."""
    path = pathlib.Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists() or path_or_repo.startswith((".", "/", "~")) or path_or_repo.count("/") != 1:
        raise HFError(f"{path_or_repo} is not a Hugging Face model folder (one with config.json and "
                      f"*.safetensors) nor a Hub repo id like HuggingFaceTB/SmolLM2-135M")
    from huggingface_hub import snapshot_download

    try:
        return pathlib.Path(snapshot_download(path_or_repo, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as error:  # offline, unknown repo, gated repo: one sentence, the cause's class named
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = ("HF_HUB_OFFLINE is set and it is not in the local cache" if offline
                else f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}")
        raise HFError(f"cannot download the Hub model {path_or_repo} ({hint}); download it where the network is "
                      f"and pass its local folder") from None


def read_config(folder: pathlib.Path) -> dict[str, Any]:
    """The folder's config.json as a dict; HFError when it is missing or not JSON."""
    file = folder / CONFIG
    if not file.is_file():
        raise HFError(f"{folder} has no {CONFIG}; point at a Hugging Face model folder")
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise HFError(f"{file} is not readable JSON ({error}); re-download the model") from None


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, the rope-scaling dict or None) from a transformers v4 (rope_theta, rope_scaling) or v5
    (rope_parameters) config."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "default":
            return float(theta), None
        if kind != "llama3":
            raise HFError(f"rope scaling of type '{kind}' (config.json rope_scaling) is not supported; "
                          f"jaxllm supports the default rope and 'llama3'")
    return float(theta), scaling


def model_config(hf: dict[str, Any]) -> ml_collections.ConfigDict:
    """The jaxllm `model` section of a Hugging Face Llama config.json dict; HFError for what jaxllm cannot run."""
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    if hf.get("model_type", "llama") != "llama" or "LlamaForCausalLM" not in archs:
        raise HFError(f"the model is {hf.get('model_type')} ({', '.join(archs)}); jaxllm imports LlamaForCausalLM only")
    for field, needed in _MUST_BE:
        if field in hf and hf[field] != needed and not (field == "sliding_window" and not hf[field]):
            raise HFError(f"config.json has {field}={hf[field]!r}; jaxllm's llama needs {field}={needed!r}")
    theta, scaling = _rope(hf)
    m = config_lib.default_config().model
    m.name = "llama"
    m.n_layer, m.n_embd = int(hf["num_hidden_layers"]), int(hf["hidden_size"])
    m.n_head = int(hf["num_attention_heads"])
    m.n_kv_head = int(hf.get("num_key_value_heads") or m.n_head)
    head_dim = int(hf.get("head_dim") or m.n_embd // m.n_head)
    m.head_dim = 0 if head_dim * m.n_head == m.n_embd else head_dim
    m.vocab_size = int(hf["vocab_size"])
    m.mlp_hidden = int(hf["intermediate_size"])
    m.norm_eps = float(hf.get("rms_norm_eps", 1e-6))
    m.rope_theta = theta
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    m.sequence_length = int(hf.get("max_position_embeddings", 2048))
    m.init_std = float(hf.get("initializer_range", 0.02))
    if scaling is not None:
        m.rope_scaling = "llama3"
        m.rope_scaling_factor = float(scaling["factor"])
        m.rope_low_freq_factor = float(scaling["low_freq_factor"])
        m.rope_high_freq_factor = float(scaling["high_freq_factor"])
        m.rope_original_max_len = int(scaling["original_max_position_embeddings"])
    return m


def _halves_to_pairs(w_NKxD: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection [N*K, D] from transformers' split-halves rotary order to adjacent pairs."""
    nk, d = w_NKxD.shape
    return w_NKxD.reshape(n_heads, 2, nk // n_heads // 2, d).transpose(0, 2, 1, 3).reshape(nk, d)


def _pairs_to_halves(w_NKxD: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `_halves_to_pairs`."""
    nk, d = w_NKxD.shape
    return w_NKxD.reshape(n_heads, nk // n_heads // 2, 2, d).transpose(0, 2, 1, 3).reshape(nk, d)


def _weight_files(folder: pathlib.Path) -> list[pathlib.Path]:
    index = folder / INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / name for name in names]
    elif (folder / WEIGHTS).is_file():
        files = [folder / WEIGHTS]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        found = ", ".join(p.name for p in folder.glob("*.bin")) or "no weight files"
        raise HFError(f"{folder} has no *.safetensors weights ({found}); jaxllm reads safetensors only "
                      f"(no pickle): convert the checkpoint with transformers' save_pretrained(safe_serialization=True)")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise HFError(f"{folder} lacks the weight shards {', '.join(missing)} named in {INDEX}; re-download the model")
    return files


def read_tensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder's safetensors files as float32 numpy arrays (bf16/fp16 upcast exactly)."""
    from safetensors import SafetensorError, safe_open

    tensors = {}
    for file in _weight_files(folder):
        try:
            with safe_open(str(file), framework="flax") as f:
                for name in f.keys():
                    tensors[name] = np.asarray(f.get_tensor(name).astype(jnp.float32))
        except (SafetensorError, OSError) as error:
            raise HFError(f"{file} is not a readable safetensors file ({error}); re-download the model") from None
    return tensors


def params_from_tensors(m, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    """The jaxllm llama param tree (float32 numpy) of transformers' LlamaForCausalLM state dict `tensors`."""
    tensors = dict(tensors)
    head = m.head_dim or m.n_embd // m.n_head

    def take(name, shape):
        if name not in tensors:
            raise HFError(f"the checkpoint has no tensor {name}; it is not a complete LlamaForCausalLM")
        w = tensors.pop(name)
        if tuple(w.shape) != tuple(shape):
            raise HFError(f"tensor {name} has shape {tuple(w.shape)}, config.json implies {tuple(shape)}")
        return w

    d, f, h, g = m.n_embd, m.mlp_hidden, m.n_head, m.n_kv_head
    params: dict[str, Any] = {"embed": {"embedding": take("model.embed_tokens.weight", (m.vocab_size, d))}}
    for i in range(m.n_layer):
        p = f"model.layers.{i}."
        params[f"blocks_{i}"] = {
            "attn_norm": {"scale": take(p + "input_layernorm.weight", (d,))},
            "attn": {"q": {"kernel": _halves_to_pairs(take(p + "self_attn.q_proj.weight", (h * head, d)), h).T},
                     "k": {"kernel": _halves_to_pairs(take(p + "self_attn.k_proj.weight", (g * head, d)), g).T},
                     "v": {"kernel": take(p + "self_attn.v_proj.weight", (g * head, d)).T},
                     "o": {"kernel": take(p + "self_attn.o_proj.weight", (d, h * head)).T}},
            "mlp_norm": {"scale": take(p + "post_attention_layernorm.weight", (d,))},
            "mlp": {"w1": {"kernel": take(p + "mlp.gate_proj.weight", (f, d)).T},
                    "w3": {"kernel": take(p + "mlp.up_proj.weight", (f, d)).T},
                    "w2": {"kernel": take(p + "mlp.down_proj.weight", (d, f)).T}},
        }
        tensors.pop(p + "self_attn.rotary_emb.inv_freq", None)  # a buffer some old checkpoints saved
    params["norm_f"] = {"scale": take("model.norm.weight", (d,))}
    if m.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    else:
        params["lm_head"] = {"kernel": take("lm_head.weight", (m.vocab_size, d)).T}
    if tensors:
        extra = sorted(tensors)
        raise HFError(f"the checkpoint has tensors jaxllm's llama has no place for ({', '.join(extra[:3])}"
                      f"{', ...' if len(extra) > 3 else ''}); it is not a plain LlamaForCausalLM")
    return _contiguous(params)


def _contiguous(tree):
    if isinstance(tree, dict):
        return {k: _contiguous(v) for k, v in tree.items()}
    return np.ascontiguousarray(tree, dtype=np.float32)


def load_pretrained(path_or_repo: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """(a full jaxllm config, float32 params) of a Hugging Face LlamaForCausalLM folder or Hub repo id.

    The config is `config.default_config()` with the model section from config.json, and, when the folder
    has a tokenizer.json, `data.tokenizer = "hf"` with `data.tokenizer_path` the folder.
    """
    folder = resolve(path_or_repo)
    config = config_lib.default_config()
    config.model = model_config(read_config(folder))
    params = params_from_tensors(config.model, read_tensors(folder))
    if (folder / "tokenizer.json").is_file():
        config.data.tokenizer = "hf"
        config.data.tokenizer_path = str(folder.resolve())
    return config, params


def hf_config(m, *, bos_id: int | None = None, eos_id: int | None = None, dtype: str = "float32") -> dict[str, Any]:
    """The transformers config.json dict of a jaxllm llama `model` section (transformers v4 field names,
    which v5 still reads)."""
    head = m.get("head_dim", 0) or m.n_embd // m.n_head
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
          "hidden_size": m.n_embd, "intermediate_size": mlp_hidden(m), "num_hidden_layers": m.n_layer,
          "num_attention_heads": m.n_head, "num_key_value_heads": m.n_kv_head or m.n_head, "head_dim": head,
          "vocab_size": m.vocab_size, "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
          "max_position_embeddings": m.sequence_length, "tie_word_embeddings": bool(m.tie_embeddings),
          "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": m.init_std,
          "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": dtype, "use_cache": True}
    if m.get("rope_scaling", "none") == "llama3":
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": m.rope_scaling_factor,
                              "low_freq_factor": m.rope_low_freq_factor, "high_freq_factor": m.rope_high_freq_factor,
                              "original_max_position_embeddings": m.rope_original_max_len}
    return hf


def tensors_from_params(m, params) -> dict[str, np.ndarray]:
    """transformers' LlamaForCausalLM state dict (float32 numpy, [out, in] weights) of jaxllm llama params."""
    h, g = m.n_head, m.n_kv_head or m.n_head
    arr = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
    out = {"model.embed_tokens.weight": arr(params["embed"]["embedding"])}
    for i in range(m.n_layer):
        b, p = params[f"blocks_{i}"], f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = arr(b["attn_norm"]["scale"])
        out[p + "self_attn.q_proj.weight"] = _pairs_to_halves(arr(b["attn"]["q"]["kernel"]).T, h)
        out[p + "self_attn.k_proj.weight"] = _pairs_to_halves(arr(b["attn"]["k"]["kernel"]).T, g)
        out[p + "self_attn.v_proj.weight"] = arr(b["attn"]["v"]["kernel"]).T
        out[p + "self_attn.o_proj.weight"] = arr(b["attn"]["o"]["kernel"]).T
        out[p + "post_attention_layernorm.weight"] = arr(b["mlp_norm"]["scale"])
        out[p + "mlp.gate_proj.weight"] = arr(b["mlp"]["w1"]["kernel"]).T
        out[p + "mlp.up_proj.weight"] = arr(b["mlp"]["w3"]["kernel"]).T
        out[p + "mlp.down_proj.weight"] = arr(b["mlp"]["w2"]["kernel"]).T
    out["model.norm.weight"] = arr(params["norm_f"]["scale"])
    if not m.tie_embeddings:
        out["lm_head.weight"] = arr(params["lm_head"]["kernel"]).T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def gpt2_hf_config(m, *, bos_id: int | None = None, eos_id: int | None = None,
                   dtype: str = "float32") -> dict[str, Any]:
    """The transformers GPT2Config dict of a jaxllm gpt2 `model` section.

    activation_function "gelu" is torch's exact erf GELU (jaxllm's `nn.gelu(approximate=False)`); attention
    scaled by 1/sqrt(head_dim) only (scale_attn_weights, no per-layer scaling, no reordered upcast); the
    dropouts are the run's model.dropout, in the places jaxllm drops (embeddings, attention probabilities,
    each residual branch), inactive at eval.
    """
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": m.vocab_size,
            "n_positions": m.sequence_length, "n_embd": m.n_embd, "n_layer": m.n_layer, "n_head": m.n_head,
            "n_inner": mlp_hidden(m), "activation_function": "gelu", "layer_norm_epsilon": m.norm_eps,
            "tie_word_embeddings": bool(m.tie_embeddings), "resid_pdrop": m.dropout, "embd_pdrop": m.dropout,
            "attn_pdrop": m.dropout, "initializer_range": m.init_std, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "add_cross_attention": False, "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": dtype,
            "use_cache": True}


def gpt2_tensors_from_params(m, params) -> dict[str, np.ndarray]:
    """transformers' GPT2LMHeadModel state dict (float32 numpy) of jaxllm gpt2 params.

    Conv1D weights are [in, out] like jaxllm's kernels: c_attn [D, 3D] is q | k | v on the out axis (the
    order transformers' `split(D, dim=2)` reads them), c_proj [D, D], c_fc [D, F], mlp.c_proj [F, D]. Every
    bias, of the LayerNorms too, is zeros; lm_head.weight [V, D] only when the head is untied.
    """
    arr = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
    d, f = m.n_embd, mlp_hidden(m)
    zeros = lambda n: np.zeros((n,), np.float32)  # noqa: E731
    out = {"transformer.wte.weight": arr(params["embed"]["embedding"]),
           "transformer.wpe.weight": arr(params["pos_embed"]["embedding"])}
    for i in range(m.n_layer):
        b, p = params[f"blocks_{i}"], f"transformer.h.{i}."
        attn = b["attn"]
        out[p + "ln_1.weight"], out[p + "ln_1.bias"] = arr(b["ln_1"]["scale"]), zeros(d)
        out[p + "attn.c_attn.weight"] = np.concatenate([arr(attn[n]["kernel"]) for n in ("q", "k", "v")], axis=1)
        out[p + "attn.c_attn.bias"] = zeros(3 * d)
        out[p + "attn.c_proj.weight"], out[p + "attn.c_proj.bias"] = arr(attn["o"]["kernel"]), zeros(d)
        out[p + "ln_2.weight"], out[p + "ln_2.bias"] = arr(b["ln_2"]["scale"]), zeros(d)
        out[p + "mlp.c_fc.weight"], out[p + "mlp.c_fc.bias"] = arr(b["mlp"]["fc"]["kernel"]), zeros(f)
        out[p + "mlp.c_proj.weight"], out[p + "mlp.c_proj.bias"] = arr(b["mlp"]["proj"]["kernel"]), zeros(d)
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = arr(params["ln_f"]["scale"]), zeros(d)
    if not m.tie_embeddings:
        out["lm_head.weight"] = arr(params["lm_head"]["kernel"]).T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def check_exportable(config) -> None:
    """HFError unless the config's model is one transformers can hold: a dense llama (LlamaForCausalLM) or
    jaxllm's gpt2 baseline (GPT2LMHeadModel)."""
    if config.model.name not in ("llama", "gpt2"):
        raise HFError(f"model.name is {config.model.name}: jaxllm exports llama and gpt2 models only")
    if config.get("moe") is not None and config.moe.n_experts:
        raise HFError("the model has mixture-of-experts layers; transformers' LlamaForCausalLM has none, so "
                      "jaxllm exports dense llama models only")
    unexpressed = llama_incompatible_options(config.model)
    if unexpressed:
        raise HFError(f"the model uses {', '.join(unexpressed)}, which a Hugging Face Llama checkpoint cannot "
                      "express; such a model is kept as a jaxllm checkpoint (generate and eval read it)")


def save_pretrained(config, params, out_dir: str | os.PathLike, *, dtype: str = "float32", tokenizer=None) -> pathlib.Path:
    """Write `params` (a dense llama's or a gpt2's float32 tree, LoRA already merged) as a Hugging Face
    LlamaForCausalLM or GPT2LMHeadModel folder: config.json, generation_config.json, model.safetensors in
    `dtype` and, given a jaxllm `tokenizer`, its tokenizer files (tokenizer.save_hf_tokenizer). Returns the
    folder."""
    from safetensors.flax import save_file

    check_exportable(config)
    if dtype not in SAVE_DTYPES:
        raise HFError(f"--dtype {dtype} is not one of {', '.join(SAVE_DTYPES)}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bos = getattr(tokenizer, "bos_id", None)
    eos = getattr(tokenizer, "eot_id", None)
    if config.model.name == "gpt2":
        hf, numpy_tensors = (gpt2_hf_config(config.model, bos_id=bos, eos_id=eos, dtype=dtype),
                             gpt2_tensors_from_params(config.model, params))
    else:
        hf, numpy_tensors = (hf_config(config.model, bos_id=bos, eos_id=eos, dtype=dtype),
                             tensors_from_params(config.model, params))
    tensors = {k: jnp.asarray(v).astype(jnp.dtype(dtype)) for k, v in numpy_tensors.items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(hf, indent=2) + "\n")
    generation = {k: v for k, v in (("bos_token_id", bos), ("eos_token_id", eos)) if v is not None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        from jaxllm import tokenizer as tokenizer_lib

        tokenizer_lib.save_hf_tokenizer(tokenizer, out)
    return out
