"""Export a run's model: `python -m jaxllm.export --workdir RUN [--stage finetune] --format hf|gguf --out PATH`.

The params of the stage's newest checkpoint (LoRA adapters merged into the base weights) leave jaxllm as
- `--format hf`: a Hugging Face LlamaForCausalLM folder, or GPT2LMHeadModel for a gpt2-baseline run
  (config.json, model.safetensors in `--dtype`, tokenizer files), that
  `transformers.AutoModelForCausalLM.from_pretrained(PATH)` loads (jaxllm/hf.py);
- `--format gguf`: one GGUF file for llama.cpp (`--quant f16|q8_0|f32`), with the llama architecture
  metadata and the tokenizer (jaxllm/gguf_io.py). `--out` is the file; a folder gets `model-<quant>.gguf`.
Both carry the run's tokenizer: jaxllm's GPT-2 BPE and byte tokenizers are written as Hugging Face
tokenizer.json equivalents (tokenizer.save_hf_tokenizer). A mixture-of-experts run is refused with one
sentence (transformers' Llama has no experts), and so is a gpt2-baseline run for `--format gguf` (jaxllm
writes GGUF's llama architecture only; export it with `--format hf`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

from jaxllm import checkpoint as checkpoint_lib
from jaxllm import config as config_lib
from jaxllm import hf
from jaxllm.data.sources import DataError
from jaxllm.generate import load_params
from jaxllm.tokenizer import TokenizerError, get_tokenizer, save_hf_tokenizer

FORMATS = ("hf", "gguf")
QUANTS = ("f16", "q8_0", "f32")


def run_dir(workdir: pathlib.Path, stage: str | None) -> pathlib.Path:
    """The folder whose checkpoints are exported: workdir/<stage>, else the last stage present, else workdir."""
    if stage:
        folder = workdir / stage
        if not (folder / "config.json").is_file():
            raise DataError(f"{workdir} has no {stage} stage (no {folder}/config.json); check --stage")
        return folder
    for name in ("finetune", "pretrain"):
        if (workdir / name / "config.json").is_file():
            return workdir / name
    if not (workdir / "config.json").is_file():
        raise DataError(f"{workdir} has no config.json; point --workdir at a jaxllm run folder")
    return workdir


def export(workdir: pathlib.Path, out: pathlib.Path, *, fmt: str, stage: str | None = None, dtype: str = "float32",
           quant: str = "f16") -> dict:
    """Write the run's model to `out` in format `fmt`; returns what was written (paths, step, seconds)."""
    start = time.monotonic()
    folder = run_dir(workdir, stage)
    config = config_lib.from_json((folder / "config.json").read_text())
    hf.check_exportable(config)
    if fmt == "gguf" and config.model.name != "llama":
        raise config_lib.ConfigError(f"the run's model is {config.model.name}, and jaxllm writes GGUF for llama "
                                     f"models only; export it with --format hf instead")
    tokenizer = get_tokenizer(config.data.tokenizer, config.data.tokenizer_path)
    params, step = load_params(folder, config)
    if fmt == "hf":
        written = hf.save_pretrained(config, params, out, dtype=dtype, tokenizer=tokenizer)
    else:
        from jaxllm import gguf_io

        if quant not in QUANTS:
            raise config_lib.ConfigError(f"--quant {quant} is not one of {', '.join(QUANTS)}")
        written = out / f"model-{quant}.gguf" if out.is_dir() or not out.suffix else out
        written.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tokenizer_dir:
            save_hf_tokenizer(tokenizer, tokenizer_dir)
            gguf_io.write_gguf(config.model, params, written, tokenizer_files=pathlib.Path(tokenizer_dir), quant=quant,
                               name=workdir.name)
    return {"format": fmt, "out": str(written), "run": str(folder), "step": step,
            "dtype": dtype if fmt == "hf" else quant, "seconds": round(time.monotonic() - start, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.export", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a jaxllm run folder")
    parser.add_argument("--stage", default=None, help="pretrain or finetune (default: the last stage the run has)")
    parser.add_argument("--format", default="hf", choices=FORMATS)
    parser.add_argument("--out", required=True, help="hf: a folder; gguf: a .gguf file (or a folder)")
    parser.add_argument("--dtype", default="float32", choices=hf.SAVE_DTYPES, help="hf: the safetensors dtype")
    parser.add_argument("--quant", default="f16", choices=QUANTS, help="gguf: the type of the 2-D weights")
    args = parser.parse_args(argv)
    try:
        row = export(pathlib.Path(args.workdir), pathlib.Path(args.out), fmt=args.format, stage=args.stage,
                     dtype=args.dtype, quant=args.quant)
    except (DataError, TokenizerError, checkpoint_lib.CheckpointError, config_lib.ConfigError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
