"""Starting from someone else's model: `hf:PATH_OR_REPO` (jaxllm/hf.py) or `gguf:FILE` (jaxllm/gguf_io.py).

Wherever a run starts from params (`finetune.init_from`, `jaxllm.eval --init_from`, `jaxllm.generate
--init_from`) such a source can be named instead of a jaxllm checkpoint. `adopt(config, source)` gives the
config that model runs under: the `model` section is the imported one (its shape, vocabulary, rope), except
the fields that say how to run it rather than what it is (compute dtype, remat, attention kernel, dropout,
residual dtype), which stay the user's; the tokenizer becomes the model's own. `load_params(source)` reads
the float32 params.
"""

from __future__ import annotations

import pathlib
from typing import Any

import ml_collections

from jaxllm.config import ConfigError

PREFIXES = ("hf:", "gguf:")
# `model` fields that say how to run a model, not what it is: they stay as the user configured them.
RUN_FIELDS = ("dtype", "param_dtype", "remat", "attention", "dropout", "residual_dtype")


def is_external(init_from: Any) -> bool:
    """True when `init_from` names a Hugging Face model (hf:...) or a GGUF file (gguf:...)."""
    return isinstance(init_from, str) and init_from.startswith(PREFIXES)


def _split(source: str) -> tuple[str, str]:
    kind, _, where = source.partition(":")
    if not where:
        raise ConfigError(f"'{source}' names no model; write hf:FOLDER_OR_REPO_ID or gguf:FILE")
    return kind, where


def imported(source: str) -> tuple[ml_collections.ConfigDict, str, str]:
    """(the imported `model` section, tokenizer name, tokenizer path) of `source`; reads no weights."""
    kind, where = _split(source)
    if kind == "hf":
        from jaxllm import hf

        folder = hf.resolve(where)
        model = hf.model_config(hf.read_config(folder))
        has_tokenizer = (folder / "tokenizer.json").is_file()
        return model, ("hf" if has_tokenizer else ""), (str(folder.resolve()) if has_tokenizer else "")
    from jaxllm import gguf_io

    try:
        folder = str(gguf_io.tokenizer_folder(where))
    except gguf_io.GGUFError:  # a weights-only GGUF: the configured tokenizer stays
        return gguf_io.model_config(where), "", ""
    return gguf_io.model_config(where), "hf", folder


def adopt(config: ml_collections.ConfigDict, source: str) -> ml_collections.ConfigDict:
    """A copy of `config` whose model section (less RUN_FIELDS) and tokenizer are those of `source`."""
    model, tokenizer, tokenizer_path = imported(source)
    out = ml_collections.ConfigDict(config.to_dict())
    for field in RUN_FIELDS:
        model[field] = config.model[field]
    out.model = model
    out.moe.n_experts = 0
    if tokenizer:
        out.data.tokenizer, out.data.tokenizer_path = tokenizer, tokenizer_path
    return out


def load_params(source: str) -> dict[str, Any]:
    """The float32 param tree (numpy) of `source`."""
    kind, where = _split(source)
    if kind == "hf":
        from jaxllm import hf

        return hf.load_pretrained(where)[1]
    from jaxllm import gguf_io

    return gguf_io.read_gguf(pathlib.Path(where))[1]
