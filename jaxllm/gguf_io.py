"""GGUF (llama.cpp's model file) in and out for jaxllm llama models: `write_gguf`, `read_gguf`,
`model_config`, `tokenizer_folder`.

`write_gguf(model_cfg, params, path, tokenizer_files=..., quant=...)` writes a "llama"-architecture GGUF
that llama.cpp (and llama-cpp-python, Ollama, LM Studio) runs with the same logits as
`models.build_model(model_cfg).apply({"params": params}, tokens_BxL)`; `read_gguf(path)` reads one back
(any llama GGUF whose tensors the `gguf` package can dequantize: F32, F16, BF16, Q4_0 ... Q8_0, the K-quants)
as the jaxllm `model` fields and a float32 param tree, for `init_from=gguf:FILE`; `model_config(path)` is
that model section from the header alone, and `tokenizer_folder(path)` the GGUF's tokenizer as a cached
Hugging Face tokenizer folder (`save_hf_tokenizer` writes one anywhere).

Conventions, as llama.cpp's convert_hf_to_gguf.py (`LlamaModel`) writes them:
- tensors are named by `gguf.TENSOR_NAMES` (token_embd, blk.N.attn_q, ..., output_norm, output) and stored
  [out, in] (the transpose of jaxllm's [in, out] kernels; the token embedding [V, D] as it is);
- q and k are stored with each head's rotary pairs adjacent (2i, 2i + 1). convert_hf_to_gguf.py permutes
  Hugging Face's split-halves rows into that order; jaxllm already rotates adjacent pairs, so its q/k
  kernels go in unpermuted (grouped-query heads likewise: query head h reads key/value head h // (H / G)
  in both);
- norms (and every 1-D tensor) stay F32; 2-D weights are F32, F16 or Q8_0 by `quant`. Q8_0 works on blocks
  of 32 along a row, so a tensor whose row length is not a multiple of 32 falls back to F16, as
  convert_hf_to_gguf.py does when `gguf.quants.quantize` raises QuantError;
- Llama 3.1 "llama3" rope scaling is the `rope_freqs.weight` tensor of K/2 per-frequency divisors (1 for
  short wavelengths, `factor` for long ones, smoothly in between): llama.cpp divides each rotary frequency
  by it. convert_hf_to_gguf.py reads original_max_position_embeddings from the top level of config.json,
  where Llama 3.1 has none, and so always uses its default 8192; jaxllm writes its own
  `model.rope_original_max_len` (8192 for every released Llama 3.x) and also records the four scaling
  fields under `jaxllm.rope.scaling.*`, keys llama.cpp ignores, so `read_gguf` gets them back exactly.
  Without those keys (a GGUF from llama.cpp) `read_gguf` fits the fields to the tensor assuming 8192.

Tokenizer: a Hugging Face byte-level BPE `tokenizer.json` (GPT-2, Llama 3, SmolLM style) becomes
tokenizer.ggml.model="gpt2", the token list padded to `vocab_size` with "[PAD{i}]" tokens of type UNUSED,
token types (added special tokens CONTROL, other added tokens USER_DEFINED), the merges, the special ids,
add_bos_token and the chat template (these last from tokenizer_config.json / chat_template.jinja via
`gguf.SpecialVocab`, exactly as convert_hf_to_gguf.py's `_set_vocab_gpt2`). tokenizer.ggml.pre, the name
of llama.cpp's built-in pre-tokenizer regex, is read off the tokenizer.json's pre_tokenizer.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import shutil
import tempfile
import warnings
from typing import Any

import numpy as np

from jaxllm.config import ConfigError, llama_incompatible_options
from jaxllm import tokenizer as tokenizer_lib

QUANTS = ("f32", "f16", "q8_0")
ARCH = "llama"
# The four llama3 rope-scaling fields, under keys llama.cpp does not read (see the module docstring).
_JAXLLM_ROPE_KEYS = {"rope_scaling_factor": "jaxllm.rope.scaling.factor",
                     "rope_low_freq_factor": "jaxllm.rope.scaling.low_freq_factor",
                     "rope_high_freq_factor": "jaxllm.rope.scaling.high_freq_factor",
                     "rope_original_max_len": "jaxllm.rope.scaling.original_max_len"}
# convert_hf_to_gguf.py's original_max_position_embeddings when config.json has none at its top level.
LLAMA_CPP_ORIGINAL_MAX_LEN = 8192
# Llama 3's pre-tokenizer regex (the Split in its tokenizer.json), llama.cpp's "llama-bpe".
_LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


# The tokenizer.json pre_tokenizer of each llama.cpp pre-tokenizer name written here (see `_pre_tokenizer`).
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_HF_PRE_TOKENIZERS = {
    "gpt-2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        {**_BYTE_LEVEL, "use_regex": False}]},
}


NO_MERGE = "<jaxllm:no-merges>"  # a symbol no text pre-tokenises to: see _add_tokenizer


class GGUFError(ConfigError):
    """A GGUF file cannot be written or read; the message says what is wrong and what to do."""


def _gguf():
    import gguf

    return gguf


# ---------------------------------------------------------------------------------------------- tensors


def _names() -> dict[str, str]:
    """jaxllm param name -> GGUF tensor name ("blk.{bid}." templates for blocks), from gguf's own tables
    of the llama architecture."""
    gguf = _gguf()
    t = gguf.MODEL_TENSOR
    kinds = {"embed": t.TOKEN_EMBD, "norm_f": t.OUTPUT_NORM, "output": t.OUTPUT, "rope_freqs": t.ROPE_FREQS,
             "attn_norm": t.ATTN_NORM, "q": t.ATTN_Q, "k": t.ATTN_K, "v": t.ATTN_V, "o": t.ATTN_OUT,
             "mlp_norm": t.FFN_NORM, "w1": t.FFN_GATE, "w3": t.FFN_UP, "w2": t.FFN_DOWN}
    assert set(kinds.values()) <= set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA])
    return {key: gguf.TENSOR_NAMES[kind] + ".weight" for key, kind in kinds.items()}


def rope_freq_factors(model_cfg) -> np.ndarray | None:
    """float32 [K/2]: llama.cpp's `rope_freqs` divisors of a llama3-scaled model, None without scaling.

    The formula of convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors: each base frequency
    theta^(-2i/K) is divided by 1 (wavelength < original_max_len / high_freq_factor), by `factor`
    (wavelength > original_max_len / low_freq_factor), or by 1 / ((1 - s) / factor + s) between, with
    s = (original_max_len / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor).
    """
    if model_cfg.get("rope_scaling", "none") != "llama3":
        return None
    head = int(model_cfg.get("head_dim", 0) or model_cfg.n_embd // model_cfg.n_head)
    return _llama3_factors(head, float(model_cfg.rope_theta), float(model_cfg.rope_scaling_factor),
                           float(model_cfg.rope_low_freq_factor), float(model_cfg.rope_high_freq_factor),
                           float(model_cfg.rope_original_max_len))


def _llama3_factors(head: int, theta: float, factor: float, low: float, high: float, original: float) -> np.ndarray:
    freqs_half = 1.0 / (theta ** (np.arange(0, head, 2, dtype=np.float32) / head))
    low_wavelen, high_wavelen = original / low, original / high
    out = []
    for freq in freqs_half:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def gguf_tensors(model_cfg, params) -> dict[str, np.ndarray]:
    """The GGUF tensors of jaxllm llama params: name -> float32 numpy, 2-D weights [out, in], in llama.cpp's
    order (token_embd, per block attn_norm, q, k, v, output, ffn_norm, gate, up, down; output_norm, output,
    rope_freqs). GGUFError for params that are not a dense jaxllm llama."""
    n = _names()
    arr = lambda x: np.ascontiguousarray(np.asarray(x, dtype=np.float32))  # noqa: E731
    try:
        out = {n["embed"]: arr(params["embed"]["embedding"])}
        for i in range(model_cfg.n_layer):
            b = params[f"blocks_{i}"]
            fmt = lambda key: n[key].format(bid=i)  # noqa: E731,B023
            out[fmt("attn_norm")] = arr(b["attn_norm"]["scale"])
            for key in ("q", "k", "v", "o"):
                out[fmt(key)] = arr(b["attn"][key]["kernel"]).T
            out[fmt("mlp_norm")] = arr(b["mlp_norm"]["scale"])
            for key in ("w1", "w3", "w2"):
                out[fmt(key)] = arr(b["mlp"][key]["kernel"]).T
        out[n["norm_f"]] = arr(params["norm_f"]["scale"])
        if not model_cfg.tie_embeddings:
            out[n["output"]] = arr(params["lm_head"]["kernel"]).T
    except (KeyError, TypeError) as error:
        raise GGUFError(f"the params have no {error} where a dense jaxllm llama has one (LoRA params must be "
                        f"merged and mixture-of-experts layers cannot be written); export a dense llama") from None
    factors = rope_freq_factors(model_cfg)
    if factors is not None:
        out[n["rope_freqs"]] = factors
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _encode(name: str, w: np.ndarray, quant: str) -> tuple[np.ndarray, Any]:
    """(the bytes or array to store, its GGMLQuantizationType) for one tensor, as convert_hf_to_gguf.py
    chooses: 1-D tensors and norms F32; 2-D weights by `quant`, Q8_0 falling back to F16 where the row
    length is not a multiple of the block size 32."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    if w.ndim <= 1 or name.endswith("_norm.weight") or quant == "f32":
        return w.astype(np.float32), q.F32
    qtype = q.F16 if quant == "f16" else q.Q8_0
    try:
        return gguf.quants.quantize(w, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(w, q.F16), q.F16


# -------------------------------------------------------------------------------------------- tokenizer


@contextlib.contextmanager
def _tokenizer_folder(tokenizer_files):
    """A folder holding tokenizer.json (and whatever else was given) for `gguf.SpecialVocab`: the folder
    itself, the folder of a tokenizer.json path, or a temporary folder with the files of a
    {file name: path} dict."""
    if isinstance(tokenizer_files, dict):
        with tempfile.TemporaryDirectory() as tmp:
            for name, src in tokenizer_files.items():
                if not pathlib.Path(src).is_file():
                    raise GGUFError(f"the tokenizer file {src} ({name}) does not exist")
                shutil.copyfile(src, pathlib.Path(tmp) / pathlib.Path(name).name)
            yield pathlib.Path(tmp)
        return
    path = pathlib.Path(tokenizer_files)
    yield path if path.is_dir() else path.parent


def _pre_tokenizer(pre: dict | None) -> str | None:
    """llama.cpp's name (tokenizer.ggml.pre) for a tokenizer.json pre_tokenizer, None when none matches.

    gpt-2: ByteLevel with its GPT-2 regex; smollm: single digits, then that regex; llama-bpe: Llama 3's
    Split regex, then ByteLevel without a regex of its own.
    """
    if not pre:
        return None
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if (kinds == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") == _LLAMA3_REGEX
            and not parts[1].get("use_regex", True)):
        return "llama-bpe"
    return None


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py's `does_token_look_special` for the byte-level BPE vocabularies written here."""
    return token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>"))


def tokenizer_vocab(folder: pathlib.Path, vocab_size: int) -> tuple[list[str], list[int], str]:
    """(tokens, token types, tokenizer.ggml.pre) of the byte-level BPE tokenizer.json in `folder`, the
    list padded to `vocab_size` with "[PAD{i}]" tokens of type UNUSED (convert_hf_to_gguf.py's
    `get_vocab_base`). GGUFError for a tokenizer that is not byte-level BPE or has ids >= vocab_size."""
    from tokenizers import Tokenizer

    gguf = _gguf()
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise GGUFError(f"{folder} has no tokenizer.json; pass the folder of a Hugging Face tokenizer "
                        f"(or tokenizer_files=None for a weights-only GGUF)")
    spec = json.loads(file.read_text(encoding="utf-8"))
    decoder = spec.get("decoder") or {}
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) and decoder.get("type") == "ByteLevel"
    if spec.get("model", {}).get("type") != "BPE" or not byte_level:
        raise GGUFError(f"{file} is a {spec.get('model', {}).get('type')} tokenizer without byte-level "
                        f"pre-tokenization; GGUF export writes byte-level BPE tokenizers (GPT-2, Llama 3, "
                        f"SmolLM style) only, so pass tokenizer_files=None for a weights-only file")
    tokenizer = Tokenizer.from_file(str(file))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if vocab and max(vocab.values()) >= vocab_size:
        raise GGUFError(f"the tokenizer has token id {max(vocab.values())} but the model's vocab_size is "
                        f"{vocab_size}; use the tokenizer the model was trained with")
    added = tokenizer.get_added_tokens_decoder()
    by_id = {i: token for token, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = by_id[i]
        if i in added:
            special = added[i].special or _looks_special(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    pre = _pre_tokenizer(spec.get("pre_tokenizer"))
    if pre is None and spec["model"].get("merges"):  # without merges the split cannot change the tokens
        warnings.warn(f"{file}'s pre-tokenizer matches none llama.cpp knows by name (gpt-2, smollm, llama-bpe); "
                      f"writing tokenizer.ggml.pre='default', so llama.cpp may split text differently from "
                      f"Hugging Face", stacklevel=3)
    pre = pre or "default"
    return tokens, types, pre


def _add_tokenizer(writer, tokenizer_files, vocab_size: int) -> None:
    gguf = _gguf()
    with _tokenizer_folder(tokenizer_files) as folder:
        tokens, types, pre = tokenizer_vocab(folder, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, load_merges=True)
        if not special.merges:
            # A merge-free BPE (jaxllm's byte tokenizer: every byte its own token). llama.cpp refuses a file
            # without a merges key and gguf writes no empty arrays, so one merge of two symbols that never
            # occur (pre-tokenised text only holds byte characters and their merges) is written instead.
            special.merges = [f"{NO_MERGE} {NO_MERGE}"]
        special.add_to_gguf(writer, quiet=True)


# ---------------------------------------------------------------------------------------------- writing


def write_gguf(model_cfg, params, path: str | os.PathLike, *, tokenizer_files=None, quant: str = "f16",
               name: str = "jaxllm") -> pathlib.Path:
    """Write a dense jaxllm llama (`model_cfg` its `model` section, `params` its float32 tree, LoRA merged)
    as a llama-architecture GGUF at `path`; returns the path.

    `quant`: "f32" (exact), "f16" (every 2-D weight rounded to float16) or "q8_0" (2-D weights in blocks
    of 32 int8 values with one float16 scale each; a tensor whose row length is not a multiple of 32 is
    written F16 instead, as llama.cpp's converter does). Norms are always F32.
    `tokenizer_files`: a Hugging Face tokenizer folder (tokenizer.json, optionally tokenizer_config.json
    and chat_template.jinja), a tokenizer.json path, or a {file name: path} dict; None writes a
    weights-only file (llama.cpp then needs its vocabulary from elsewhere).
    """
    gguf = _gguf()
    if model_cfg.name != "llama":
        raise GGUFError(f"model.name is {model_cfg.name}; GGUF export writes llama models only")
    unexpressed = llama_incompatible_options(model_cfg)
    if unexpressed:
        raise GGUFError(f"the model uses {', '.join(unexpressed)}, which llama.cpp's llama architecture cannot "
                        "express; such a model is kept as a jaxllm checkpoint (generate and eval read it)")
    if quant not in QUANTS:
        raise GGUFError(f"quant '{quant}' is not one of {', '.join(QUANTS)}")
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    tensors = gguf_tensors(model_cfg, params)
    head = int(model_cfg.get("head_dim", 0) or model_cfg.n_embd // model_cfg.n_head)
    mlp = tensors[_names()["w1"].format(bid=0)].shape[0]
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch=ARCH)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(int(model_cfg.sequence_length))
    writer.add_embedding_length(int(model_cfg.n_embd))
    writer.add_block_count(int(model_cfg.n_layer))
    writer.add_feed_forward_length(int(mlp))
    writer.add_head_count(int(model_cfg.n_head))
    writer.add_head_count_kv(int(model_cfg.n_kv_head or model_cfg.n_head))
    writer.add_rope_freq_base(float(model_cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(model_cfg.norm_eps))
    writer.add_file_type(file_type)
    writer.add_vocab_size(int(model_cfg.vocab_size))
    writer.add_rope_dimension_count(head)
    if model_cfg.get("rope_scaling", "none") == "llama3":
        for field, key in _JAXLLM_ROPE_KEYS.items():
            if field == "rope_original_max_len":
                writer.add_uint32(key, int(model_cfg[field]))
            else:
                writer.add_float32(key, float(model_cfg[field]))
    if tokenizer_files is not None:
        _add_tokenizer(writer, tokenizer_files, int(model_cfg.vocab_size))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for tensor_name, w in tensors.items():
        data, qtype = _encode(tensor_name, w, quant)
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


# ---------------------------------------------------------------------------------------------- reading


def _reader(path):
    gguf = _gguf()
    path = pathlib.Path(path)
    if not path.is_file():
        raise GGUFError(f"the GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as error:
        raise GGUFError(f"{path} is not a readable GGUF file ({type(error).__name__}: {error}); re-download or "
                        f"re-export it") from None


def metadata(reader) -> dict[str, Any]:
    """Every key of a GGUFReader's header except the token arrays, as Python values."""
    arrays = {f"tokenizer.ggml.{name}" for name in ("tokens", "token_type", "merges", "scores")}
    return {key: field.contents() for key, field in reader.fields.items() if key not in arrays}


def _float(value) -> float:
    """A float32 header value as the shortest decimal that rounds to it (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _rope_fields(meta: dict[str, Any], factors: np.ndarray, head: int, theta: float) -> dict[str, Any]:
    """The llama3 rope-scaling fields of a GGUF's rope_freqs tensor: jaxllm's own keys when present, else
    fitted to the tensor with llama.cpp's original_max_len of 8192 (GGUFError when no fit reproduces it)."""
    if all(key in meta for key in _JAXLLM_ROPE_KEYS.values()):
        fields = {field: _float(meta[key]) for field, key in _JAXLLM_ROPE_KEYS.items()}
        fields["rope_original_max_len"] = int(meta[_JAXLLM_ROPE_KEYS["rope_original_max_len"]])
    else:
        original = float(LLAMA_CPP_ORIGINAL_MAX_LEN)
        factor = float(factors.max())
        freqs_half = 1.0 / (theta ** (np.arange(0, head, 2, dtype=np.float32) / head))
        wavelen_half = 2 * math.pi / freqs_half
        medium = (factors > 1.0 + 1e-6) & (factors < factor - 1e-6)
        low, high = 1.0, 4.0  # Llama 3.1's, when too few frequencies are in the smooth band to fit them
        if medium.sum() >= 2 and factor > 1:
            # s = (original / wavelen - low) / (high - low) is linear in 1 / wavelen: fit a, b of s = a / wavelen + b.
            smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
            a, b = np.polyfit(1 / wavelen_half[medium], smooth, 1)
            low = -b * original / a
            high = low + original / a
        fields = {"rope_scaling_factor": factor, "rope_low_freq_factor": _round(low),
                  "rope_high_freq_factor": _round(high), "rope_original_max_len": int(original)}
    got = _llama3_factors(head, theta, fields["rope_scaling_factor"], fields["rope_low_freq_factor"],
                          fields["rope_high_freq_factor"], fields["rope_original_max_len"])
    if got.shape != factors.shape or not np.allclose(got, factors, rtol=1e-4):
        raise GGUFError("the GGUF's rope_freqs tensor is not a llama3 rope scaling jaxllm can reproduce; "
                        "jaxllm runs the default rope and Llama 3.1's llama3 scaling only")
    return {"rope_scaling": "llama3", **fields}


def _round(x: float) -> float:
    return float(round(x, 4))


def _dequantized(tensor) -> np.ndarray:
    """float32 numpy of a GGUFReader tensor in numpy order ([out, in] for weights)."""
    gguf = _gguf()
    shape = tuple(int(s) for s in reversed(tensor.shape))
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise GGUFError(f"tensor {tensor.name} is stored as {tensor.tensor_type.name}, which the gguf package "
                        f"cannot dequantize; use a GGUF in F32, F16, BF16, Q4_0 ... Q8_0 or a K-quant") from None
    return np.ascontiguousarray(np.asarray(values, dtype=np.float32).reshape(shape))


def _model_fields(reader, path) -> dict[str, Any]:
    """The jaxllm `model` fields of an open GGUF, from its header and tensor shapes (no weights read)."""
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise GGUFError(f"{path} holds a '{arch}' model; jaxllm reads llama-architecture GGUFs only")
    infos = {t.name: t for t in reader.tensors}
    n = _names()

    def key(name, default=None):
        value = meta.get(f"{ARCH}.{name}", default)
        if value is None:
            raise GGUFError(f"{path} has no {ARCH}.{name} in its header; it is not a complete llama GGUF")
        return value

    def shape(name) -> tuple[int, ...]:  # numpy order: [out, in]
        if name not in infos:
            raise GGUFError(f"{path} has no tensor {name}; it is not a complete llama GGUF")
        return tuple(int(s) for s in reversed(infos[name].shape))

    if key("expert_count", 0):
        raise GGUFError(f"{path} is a mixture-of-experts llama; jaxllm reads dense llama GGUFs only")
    scaling = meta.get(f"{ARCH}.rope.scaling.type", "none")
    if scaling not in ("none", ""):
        raise GGUFError(f"{path} uses rope scaling '{scaling}'; jaxllm runs the default rope and llama3 scaling only")
    d, h = int(key("embedding_length")), int(key("attention.head_count"))
    head = int(key("attention.key_length", 0) or shape(n["q"].format(bid=0))[0] // h)
    if int(key("rope.dimension_count", head)) != head:
        raise GGUFError(f"{path} rotates {key('rope.dimension_count')} of each head's {head} dims; jaxllm's "
                        f"rope rotates whole heads")
    theta = _float(key("rope.freq_base", 10000.0))
    fields: dict[str, Any] = {
        "name": "llama", "n_layer": int(key("block_count")), "n_embd": d, "n_head": h,
        "n_kv_head": int(key("attention.head_count_kv", h)), "head_dim": 0 if head * h == d else head,
        "mlp_hidden": int(key("feed_forward_length")), "vocab_size": shape(n["embed"])[0],
        "norm_eps": _float(key("attention.layer_norm_rms_epsilon", 1e-5)), "rope_theta": theta,
        "tie_embeddings": n["output"] not in infos, "sequence_length": int(key("context_length", 2048)),
        "rope_scaling": "none"}
    if n["rope_freqs"] in infos:
        fields.update(_rope_fields(meta, _dequantized(infos[n["rope_freqs"]]), head, theta))
    return fields


def model_fields(path: str | os.PathLike) -> dict[str, Any]:
    """The jaxllm `model` fields of a llama GGUF (see `read_gguf`), from its header alone: no weights read."""
    return _model_fields(_reader(path), path)


def model_config(path: str | os.PathLike):
    """The jaxllm `model` config section of a llama GGUF: `config.default_config().model` with
    `model_fields(path)` set (how to run it, dtype, remat, attention, stays default)."""
    from jaxllm import config as config_lib

    m = config_lib.default_config().model
    for field, value in model_fields(path).items():
        m[field] = value
    return m


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the jaxllm `model` fields, float32 numpy params) of a llama-architecture GGUF; quantized tensors
    are dequantized with `gguf.quants.dequantize`.

    The fields are name, n_layer, n_embd, n_head, n_kv_head, head_dim (0 when n_embd / n_head),
    mlp_hidden, vocab_size, norm_eps, rope_theta, tie_embeddings (no output.weight), sequence_length
    (the GGUF's context_length, e.g. 8192 for SmolLM2: lower it to train) and rope_scaling ("none", or
    "llama3" with its four fields when there is a rope_freqs tensor); the caller sets them on a config.
    GGUFError for another architecture, a mixture of experts, partial or other rope, biases, missing
    tensors or a tensor type the gguf package cannot dequantize.
    """
    reader = _reader(path)
    m = _model_fields(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    tensors.pop(_names()["rope_freqs"], None)  # read into the rope fields
    n = _names()

    def take(name, shape):
        if name not in tensors:
            raise GGUFError(f"{path} has no tensor {name}; it is not a complete llama GGUF")
        w = _dequantized(tensors.pop(name))
        if w.shape != tuple(shape):
            raise GGUFError(f"tensor {name} in {path} has shape {w.shape}, its header implies {tuple(shape)}")
        return w

    d, f, v, h, g = m["n_embd"], m["mlp_hidden"], m["vocab_size"], m["n_head"], m["n_kv_head"]
    head = m["head_dim"] or d // h
    params: dict[str, Any] = {"embed": {"embedding": take(n["embed"], (v, d))}}
    for i in range(m["n_layer"]):
        fmt = lambda k: n[k].format(bid=i)  # noqa: E731,B023
        params[f"blocks_{i}"] = {
            "attn_norm": {"scale": take(fmt("attn_norm"), (d,))},
            "attn": {"q": {"kernel": take(fmt("q"), (h * head, d)).T},
                     "k": {"kernel": take(fmt("k"), (g * head, d)).T},
                     "v": {"kernel": take(fmt("v"), (g * head, d)).T},
                     "o": {"kernel": take(fmt("o"), (d, h * head)).T}},
            "mlp_norm": {"scale": take(fmt("mlp_norm"), (d,))},
            "mlp": {"w1": {"kernel": take(fmt("w1"), (f, d)).T},
                    "w3": {"kernel": take(fmt("w3"), (f, d)).T},
                    "w2": {"kernel": take(fmt("w2"), (d, f)).T}},
        }
    params["norm_f"] = {"scale": take(n["norm_f"], (d,))}
    if not m["tie_embeddings"]:
        params["lm_head"] = {"kernel": take(n["output"], (v, d)).T}
    if tensors:
        extra = sorted(tensors)
        raise GGUFError(f"{path} has tensors jaxllm's llama has no place for ({', '.join(extra[:3])}"
                        f"{', ...' if len(extra) > 3 else ''}); it is not a plain llama (biases? experts?)")
    return m, _contiguous(params)


def _contiguous(tree):
    if isinstance(tree, dict):
        return {k: _contiguous(v) for k, v in tree.items()}
    return np.ascontiguousarray(tree, dtype=np.float32)


# -------------------------------------------------------------------------------- tokenizer, the way back


def save_hf_tokenizer(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
    """Write the tokenizer of a GGUF as a Hugging Face tokenizer folder (tokenizer.json,
    tokenizer_config.json, chat_template.jinja when it has one) in `out_dir`; returns the folder.

    transformers builds it offline from the GGUF header (`AutoTokenizer.from_pretrained(folder,
    gguf_file=name)`). Its GGUF converter gives every byte-level BPE GPT-2's pre-tokenizer, so for a
    tokenizer.ggml.pre of "smollm" (digits split one by one) or "llama-bpe" (Llama 3's regex) the
    tokenizer.json's pre_tokenizer is then set to that one, as the original Hugging Face tokenizer has it.
    """
    path = pathlib.Path(gguf_path)
    reader = _reader(path)
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise GGUFError(f"{path} has no tokenizer (it was written weights-only); take the tokenizer from "
                        f"where the model came from")
    pre = reader.fields["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in reader.fields else None
    del reader
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent.resolve()), gguf_file=path.name)
    except (ValueError, KeyError, OSError, NotImplementedError) as error:
        raise GGUFError(f"transformers cannot build a tokenizer from {path} ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:200] if str(error) else ''})") from None
    out = pathlib.Path(out_dir)
    tokenizer.save_pretrained(str(out))
    file = out / "tokenizer.json"
    if pre in _HF_PRE_TOKENIZERS and file.is_file():
        spec = json.loads(file.read_text(encoding="utf-8"))
        if _pre_tokenizer(spec.get("pre_tokenizer")) != pre:
            spec["pre_tokenizer"] = _HF_PRE_TOKENIZERS[pre]
            file.write_text(json.dumps(spec, ensure_ascii=False, indent=2), encoding="utf-8")
    return out


def tokenizer_folder(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """A Hugging Face tokenizer folder of the GGUF's tokenizer (`save_hf_tokenizer`), written once into a
    cache (`cache_dir`, default jaxllm's cache folder, $JAXLLM_CACHE or ~/.cache/jaxllm, /gguf-tokenizers) under a name
    from the file's path, size and modification time, so a GGUF in a read-only place works and a changed
    file gets a fresh folder."""
    import hashlib

    path = pathlib.Path(gguf_path).resolve()
    if not path.is_file():
        raise GGUFError(f"the GGUF file {path} does not exist")
    stat = path.stat()
    digest = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = pathlib.Path(cache_dir) if cache_dir is not None else tokenizer_lib.cache_dir() / "gguf-tokenizers"
    folder = root / f"{path.stem}-{digest}"
    if (folder / "tokenizer.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        save_hf_tokenizer(path, pathlib.Path(tmp) / "out")
        try:
            os.replace(pathlib.Path(tmp) / "out", folder)  # atomic: a concurrent run finds all or nothing
        except OSError:
            if not (folder / "tokenizer.json").is_file():
                raise
    return folder
