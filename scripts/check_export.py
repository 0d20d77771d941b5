"""Compare an exported model's logits with the run's own: transformers on an HF folder, llama.cpp on a GGUF file.

    python scripts/check_export.py --workdir RUN [--stage finetune] [--hf DIR] [--gguf FILE] [--prompt TEXT]

Prints one JSON row per export: tokens, max |logit difference| against jaxllm (float32), the largest jaxllm
logit, and the fraction of positions where both pick the same top token. Needs transformers + torch for
--hf and llama-cpp-python for --gguf (neither is a jaxllm dependency).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a checkout

from jaxllm import config as config_lib  # noqa: E402
from jaxllm import models  # noqa: E402
from jaxllm.export import run_dir  # noqa: E402
from jaxllm.generate import load_params  # noqa: E402
from jaxllm.tokenizer import get_tokenizer  # noqa: E402

PROMPT = "Question: a train travels 60 km in 45 minutes . what is its speed in km / hr ?\nAnswer:"


def compare(ours_LxV: np.ndarray, theirs_LxV: np.ndarray) -> dict:
    return {"max_abs_diff": float(np.abs(ours_LxV - theirs_LxV).max()),
            "max_abs_logit": float(np.abs(ours_LxV).max()),
            "argmax_agree": float((ours_LxV.argmax(-1) == theirs_LxV.argmax(-1)).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--stage", default=None)
    parser.add_argument("--hf", default=None, help="a folder written by `jaxllm.export --format hf`")
    parser.add_argument("--gguf", default=None, help="a file written by `jaxllm.export --format gguf`")
    parser.add_argument("--prompt", default=PROMPT)
    args = parser.parse_args()
    folder = run_dir(pathlib.Path(args.workdir), args.stage)
    config = config_lib.from_json((folder / "config.json").read_text())
    tokenizer = get_tokenizer(config.data.tokenizer, config.data.tokenizer_path)
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]  # as fine-tuning and scoring feed it
    ids = bos + tokenizer.encode(args.prompt)
    params, _ = load_params(folder, config)
    logits = models.build_model(config.model).apply({"params": params}, jnp.asarray([ids]), deterministic=True)
    ours_LxV = np.asarray(logits, np.float32)[0]
    if args.hf:
        import torch
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(args.hf, torch_dtype=torch.float32)
        with torch.no_grad():
            theirs_LxV = model(torch.tensor([ids])).logits[0].numpy()
        print(json.dumps({"export": args.hf, "tokens": len(ids), **compare(ours_LxV, theirs_LxV)}))
    if args.gguf:
        import llama_cpp

        llm = llama_cpp.Llama(args.gguf, logits_all=True, verbose=False, n_ctx=max(512, len(ids)))
        cpp_ids = bos + llm.tokenize(args.prompt.encode(), add_bos=False, special=False)
        llm.eval(cpp_ids)
        theirs_LxV = np.asarray(llm.scores[: len(cpp_ids)], np.float32)
        print(json.dumps({"export": args.gguf, "tokens": len(ids), "same_token_ids": cpp_ids == ids,
                          **(compare(ours_LxV, theirs_LxV) if cpp_ids == ids else {})}))
        llm.close()


if __name__ == "__main__":
    main()
