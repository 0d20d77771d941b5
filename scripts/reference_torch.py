"""Train with the reference PyTorch code itself (epfml/llm-baselines at f016ae5) on jaxllm's prepared data.

`python scripts/reference_torch.py --baselines PATH --config configs/reference_cpu.py --workdir RUN [--seed S]`

PATH is a checkout of the reference: `git clone https://github.com/epfml/llm-baselines PATH && git -C PATH
checkout f016ae5`. Nothing of it is copied or changed: its own `main.main` builds the model, the AdamW groups
and the OneCycleLR schedule and runs its own `train_base` loop; this script only feeds it and listens:

- data: the jaxllm config's `data` section is prepared with jaxllm's pipeline (the same train.bin / val.bin the
  jaxllm run reads) and handed to the reference in place of its SlimPajama download;
- flags: the reference's command-line flags are derived from the jaxllm config (shape, batch, steps, lr,
  betas, weight decay, clipping, one-cycle warm-up, evaluation interval, init seed, data seed), so the two
  runs are the same recipe; anything after `--` is passed on to the reference unchanged;
- metrics: the reference logs to Weights & Biases (`--wandb`); a stand-in `wandb` module records those logs
  as jaxllm metrics rows in RUN/metrics.jsonl (train loss, lr, val loss, tokens_seen, elapsed_s; its last
  evaluation, over every validation window, is the `full` row), so `python -m jaxllm.compare` reads the
  run beside jaxllm's;
- tiktoken: the reference's model asks `tiktoken.get_encoding("gpt2")` (for its text samples); offline that
  is jaxllm's verified local copy of the same file;
- its checkpoint (a torch.save pickle) is not written: the run is a measurement, and jaxllm keeps no pickles.

On a CPU the reference trains in float32 (its autocast is CUDA-only) and eagerly unless `-- --compile`.
The reference's training loss is logged only at its evaluations (one micro-batch's), and its wall clock
starts at `wandb.init`, before the data loader is built, so compare its losses, not its times.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import types

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout

from jaxllm import config as config_lib  # noqa: E402
from jaxllm import tokenizer as tokenizer_lib  # noqa: E402
from jaxllm.data import batches, prepare  # noqa: E402

COMMIT = "f016ae5"


class BaselinesError(RuntimeError):
    """A reference checkout or config this script cannot run, said in one sentence."""


def reference_flags(config) -> list[str]:
    """llm-baselines' command-line flags for the recipe in jaxllm config `config` (pretraining stage)."""
    m, o, t = config.model, config.optim, config.train
    plain = (m.name == "llama" and m.n_kv_head in (0, m.n_head) and not m.mlp_hidden and m.tie_embeddings
             and m.mlp_activation == "swiglu" and not (m.qk_norm or m.zero_init_proj or m.logit_softcap))
    if not plain or m.rope_theta != 10000 or m.head_init_std >= 0:
        raise BaselinesError("the reference's llama2 is plain multi-head attention (RoPE theta 10000) with SwiGLU of "
                             "the default width and a tied head; this config's model differs (see model.*)")
    if o.name != "adamw" or o.schedule not in ("cos", "linear") or o.div_factor != 100 or o.final_div_factor != 0.1:
        raise BaselinesError("the reference trains with AdamW on the one-cycle schedule (optim.schedule cos or "
                             "linear, div_factor 100, final_div_factor 0.1); this config asks for something else")
    return ["--model", "llama2", "--n_layer", str(m.n_layer), "--n_embd", str(m.n_embd), "--n_head", str(m.n_head),
            "--sequence_length", str(m.sequence_length), "--vocab_size", str(m.vocab_size),
            "--batch_size", str(t.batch_size), "--acc_steps", str(t.grad_accum), "--iterations", str(t.steps),
            "--lr", str(o.lr), "--beta1", str(o.beta1), "--beta2", str(o.beta2), "--weight_decay", str(o.weight_decay),
            "--grad_clip", str(o.grad_clip), "--scheduler", o.schedule, "--warmup_percent", str(o.warmup_pct),
            "--eval_freq", str(t.eval_every), "--seed", str(config.seed), "--data_seed", str(config.data.seed),
            "--dropout", str(m.dropout), "--device", "cpu", "--wandb"]


class MetricsRecorder(types.ModuleType):
    """A stand-in `wandb` module: the reference's `wandb.log` calls become jaxllm metrics rows."""

    def __init__(self, path: pathlib.Path, tokens_per_iter: int):
        super().__init__("wandb")
        self.path, self.tokens_per_iter = path, tokens_per_iter
        self.run = types.SimpleNamespace(name="reference")
        self.start = None
        self.last = None  # (iter, time) of the previous log: the interval's tokens/s

    def init(self, **_):
        self.start = time.monotonic()
        self.last = (0, self.start)
        self.path.write_text("")

    class Table:
        def __init__(self, columns):
            self.columns = columns

        def add_data(self, *row):
            pass

    def log(self, logs: dict) -> None:
        if "iter" not in logs:
            return  # the generated-text tables
        now, step = time.monotonic(), int(logs["iter"])
        rate = (step - self.last[0]) * self.tokens_per_iter / (now - self.last[1])
        self.last = (step, now)
        train = {"step": step, "split": "train", "loss": logs["train/loss"], "lr": logs["lr"],
                 "tokens_per_s": rate, "tokens_seen": step * self.tokens_per_iter, "elapsed_s": now - self.start}
        val = {"step": step, "split": "val", "loss": logs["val/loss"], "perplexity": logs["val/perplexity"],
               "accuracy": logs["val/acc"]}
        if "val/final-loss" in logs:
            val["full"] = True  # the reference's last evaluation runs over every validation window
        with self.path.open("a") as file:
            file.write(json.dumps(train) + "\n" + json.dumps(val) + "\n")
        print(f"step {step}: train loss {train['loss']:.4f}, val loss {val['loss']:.4f}", flush=True)


def load_reference(baselines: pathlib.Path):
    """Import the reference's `main` module from checkout `baselines` (its src/ on sys.path)."""
    src = baselines / "src"
    if not (src / "main.py").is_file() or not (src / "optim" / "base.py").is_file():
        raise BaselinesError(f"{baselines} is not an llm-baselines checkout (no src/main.py); clone "
                             f"epfml/llm-baselines and check out {COMMIT}")
    sys.path.insert(0, str(src))
    import main as reference_main  # noqa: E402  (the reference's own module)
    import optim.base as reference_loop  # noqa: E402

    return reference_main, reference_loop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baselines", required=True, help=f"a checkout of epfml/llm-baselines at {COMMIT}")
    parser.add_argument("--config", default=str(REPO / "configs" / "reference_cpu.py"),
                        help="the jaxllm config whose data and recipe to run")
    parser.add_argument("--workdir", required=True, help="where metrics.jsonl (and the reference's summary) go")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args, rest = parser.parse_known_args(argv)
    overrides = [a[len("--config."):] for a in rest if a.startswith("--config.")]
    passthrough = [a for a in rest if not a.startswith("--config.") and a != "--"]

    config = config_lib.load_config(args.config, overrides)
    flags = reference_flags(config)
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    tokenizer = tokenizer_lib.get_tokenizer(config.data.tokenizer, config.data.tokenizer_path)
    data_dir = prepare.prepare(config.data, tokenizer)
    data = {"train": batches.open_tokens(data_dir / "train.bin"), "val": batches.open_tokens(data_dir / "val.bin")}

    import tiktoken
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    get_encoding = tiktoken.get_encoding
    tiktoken.get_encoding = lambda name: tokenizer.encoding if name == "gpt2" else get_encoding(name)
    tokens_per_iter = config.train.batch_size * config.train.grad_accum * config.model.sequence_length
    sys.modules["wandb"] = MetricsRecorder(workdir / "metrics.jsonl", tokens_per_iter)

    reference_main, reference_loop = load_reference(pathlib.Path(args.baselines).resolve())
    reference_main.get_dataset = lambda _: data
    reference_loop.save_checkpoint = lambda **_: None
    reference_args = _parse_reference_args(
        reference_main, flags + ["--results_base_folder", str(workdir / "reference"), *passthrough])
    print(f"llm-baselines {' '.join(flags + passthrough)}", flush=True)
    reference_main.main(reference_args)
    return 0


def _parse_reference_args(reference_main, flags: list[str]):
    """The reference's own argument parsing (`main.get_args`) over `flags` instead of sys.argv."""
    argv = sys.argv
    sys.argv = [argv[0], *flags]
    try:
        return reference_main.get_args()
    finally:
        sys.argv = argv


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BaselinesError, config_lib.ConfigError, tokenizer_lib.TokenizerError, prepare.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
