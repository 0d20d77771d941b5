"""Choose a model shape for a compute budget: `python -m jaxllm.plan --budget_hours 3 --device a100
[--mfu 0.4 | --measured RUN] [--seq_len 512]`.

What the 2024 winner did by hand (his notes: ~100k tokens/s for 3 h is ~1.08B tokens, ~6 tokens per parameter
of his 177M-parameter model; "going wider was the most throughput efficient method"), for a grid of llama
shapes (depth x width, heads of `--head_dim`):

    FLOPs/token      jaxllm.models.flops_per_token of the base config with that shape (see `shape_costs`)
    FLOP/s           the device's dense peak (jaxllm/hardware.py's table, in the matmul precision of --dtype)
                     x --mfu; or, with --measured RUN, what RUN achieved: the median tokens_per_s of its
                     metrics.jsonl x its own model's FLOPs/token (a shape with f FLOPs/token then runs at
                     achieved / f tokens/s: the same hardware efficiency, whatever the shape)
    tokens           budget_s x FLOP/s / FLOPs/token
    tokens/param     tokens / params, params counted with the embedding (as Chinchilla and the winner did)

It prints the table, then recommends by a stated rule (`recommend`): among shapes whose width/depth lies in
`ASPECT` and whose tokens/param is within `TOLERANCE` of `--target_ratio` (default 6, the winner's;
Chinchilla's compute-optimal ~20 is shown beside it), the widest (the winner found width the cheapest way to
add parameters), else the closest ratio; and prints the `--config.model.*` overrides (and `train.steps` at
`--batch_tokens` tokens per step) that select it. Assumed: every shape reaches the same MFU (small widths reach
less in truth).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any, Sequence

import ml_collections

from jaxllm import compare as compare_lib
from jaxllm import config as config_lib
from jaxllm import hardware, models
from jaxllm.config import ConfigError

DEPTHS = (4, 6, 8, 10, 12, 16, 20, 24, 32)
WIDTHS = (256, 384, 512, 640, 768, 1024, 1280, 1536, 2048)
ASPECT = (32.0, 128.0)  # width / depth of the shapes the rule picks from (the winner: 1024/10; llama 768/12)
TOLERANCE = 0.15  # a tokens/param within 15% of the target counts as on target (the grid is coarse)
CHINCHILLA_RATIO = 20.0  # tokens per parameter, compute-optimal (Hoffmann et al. 2022)
WINNER_RATIO = 6.0  # the 2024 winner: ~1.08B tokens on ~177M params (180M as jaxllm counts them)


@dataclasses.dataclass(frozen=True)
class Shape:
    """One candidate: a llama of `n_layer` blocks of width `n_embd` with `n_head` heads, and its costs."""

    n_layer: int
    n_embd: int
    n_head: int
    params: int
    flops_per_token: float
    tokens_per_s: float = 0.0  # at the plan's FLOP/s
    tokens: float = 0.0  # in the plan's budget

    @property
    def ratio(self) -> float:
        """Tokens per parameter."""
        return self.tokens / self.params

    @property
    def aspect(self) -> float:
        return self.n_embd / self.n_layer

    @property
    def name(self) -> str:
        return f"{self.n_layer}L/{self.n_embd}/{self.n_head}h"


def shape_model(base_model, n_layer: int, n_embd: int, head_dim: int) -> ml_collections.ConfigDict:
    """The `model` section `base_model` with n_layer, n_embd and n_head = n_embd / head_dim (plain multi-head
    attention, head size n_embd / n_head); every other field (vocab, sequence length, MLP rule...) kept."""
    if n_embd % head_dim:
        raise ConfigError(f"width {n_embd} is not a multiple of the head size {head_dim}; choose widths that are")
    m = ml_collections.ConfigDict(base_model.to_dict())
    m.n_layer, m.n_embd, m.n_head = int(n_layer), int(n_embd), int(n_embd // head_dim)
    m.n_kv_head, m.head_dim = 0, 0
    return m


def shape_costs(base_model, depths: Sequence[int], widths: Sequence[int], head_dim: int) -> list[Shape]:
    """Params and FLOPs/token of every (depth, width) of a dense llama, from jaxllm.models (param_count,
    flops_per_token) at depths 1 and 2 of each width: every block of a dense model is the same, so both grow
    by the same amount per block, and depth d costs cost(1) + (d - 1) x (cost(2) - cost(1)). That is exact
    (tests/test_plan.py checks it against the direct count at configs/wide.py's 10 layers) and ~1 s where
    tracing each shape would take a minute."""
    shapes = []
    for width in widths:
        one, two = (shape_model(base_model, depth, width, head_dim) for depth in (1, 2))
        p1, p2 = models.param_count(one), models.param_count(two)
        f1, f2 = models.flops_per_token(one), models.flops_per_token(two)
        for depth in depths:
            shapes.append(Shape(n_layer=depth, n_embd=width, n_head=width // head_dim,
                                params=p1 + (depth - 1) * (p2 - p1), flops_per_token=f1 + (depth - 1) * (f2 - f1)))
    return sorted(shapes, key=lambda s: (s.params, s.n_layer))


def budget_tokens(budget_s: float, flops_per_s: float, flops_per_token: float) -> float:
    """Tokens a budget of `budget_s` seconds at `flops_per_s` trains a model of `flops_per_token` on."""
    return budget_s * flops_per_s / flops_per_token


def with_budget(shapes: Sequence[Shape], budget_s: float, flops_per_s: float) -> list[Shape]:
    """`shapes` with their tokens/s and tokens at `flops_per_s` for `budget_s` seconds."""
    return [dataclasses.replace(s, tokens_per_s=flops_per_s / s.flops_per_token,
                                tokens=budget_tokens(budget_s, flops_per_s, s.flops_per_token)) for s in shapes]


def recommend(shapes: Sequence[Shape], target_ratio: float, aspect: tuple[float, float] = ASPECT,
              tolerance: float = TOLERANCE) -> Shape:
    """The rule: among `shapes` with aspect[0] <= width/depth <= aspect[1], those whose tokens/param is within
    a factor 1 + `tolerance` of `target_ratio`; of them the widest (the winner's finding: width buys
    parameters at the least cost in throughput), then the closest ratio. When none is that close, the shape
    closest to the target on a log scale. With no shape in the aspect range, all shapes compete."""
    allowed = [s for s in shapes if aspect[0] <= s.aspect <= aspect[1]] or list(shapes)
    distance = {s: abs(math.log(s.ratio / target_ratio)) for s in allowed}
    near = [s for s in allowed if distance[s] <= math.log1p(tolerance)]
    if near:
        return min(near, key=lambda s: (-s.n_embd, distance[s], s.params))
    return min(allowed, key=lambda s: (distance[s], s.params))


def device_peak(device: str, dtype: str) -> tuple[float, str]:
    """(dense peak FLOP/s of one `device`, its table column) for a run whose compute dtype is `dtype`."""
    device = device.lower()
    if device not in hardware.PEAK_FLOPS:
        raise ConfigError(f"--device is '{device}'; choose one of {', '.join(sorted(hardware.PEAK_FLOPS))}")
    precision = hardware.matmul_precision(dtype)
    return hardware.PEAK_FLOPS[device][precision], precision


def measured_flops(run: str, stage: str | None = None) -> tuple[float, dict[str, Any]]:
    """(the model FLOP/s `run` achieved, how): the median `tokens_per_s` of its train rows x its model's
    FLOPs/token (its stage folder's config.json). CompareError/ConfigError when the run cannot tell."""
    folder = compare_lib.stage_dir(run, stage)
    summary = compare_lib.summarize(compare_lib.load_rows(folder), str(run))
    if summary.tokens_per_s is None:
        raise compare_lib.CompareError(f"{folder / 'metrics.jsonl'} holds no train row with a tokens_per_s; let "
                                       f"the run log a few steps (train.log_every) first")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise compare_lib.CompareError(f"{config_file} does not exist: the run's model is unknown; give the "
                                       f"workdir of a jaxllm.train run")
    config = config_lib.from_json(config_file.read_text())
    per_token = models.flops_per_token(config.model, config.get("moe"))
    return summary.tokens_per_s * per_token, {"tokens_per_s": summary.tokens_per_s, "flops_per_token": per_token,
                                              "model": config.model, "folder": folder}


def overrides(shape: Shape, base_model, seq_len: int | None, steps: int | None) -> str:
    """The `--config.*` overrides of jaxllm.train that select `shape`."""
    items = [f"model.n_layer={shape.n_layer}", f"model.n_embd={shape.n_embd}", f"model.n_head={shape.n_head}"]
    if base_model.get("n_kv_head", 0) or base_model.get("head_dim", 0):
        items += ["model.n_kv_head=0", "model.head_dim=0"]
    if seq_len is not None:
        items.append(f"model.sequence_length={seq_len}")
    if steps is not None:
        items.append(f"train.steps={steps}")
    return " ".join(f"--config.{item}" for item in items)


def table(shapes: Sequence[Shape], marks: dict[Shape, str], batch_tokens: int) -> str:
    """The plan's table, a line per shape; `marks` labels some shapes at the end of their line."""
    header = ["shape", "params", "FLOPs/token", "tokens/s", "tokens", "tokens/param", "steps", ""]
    lines = [header] + [[s.name, compare_lib.format_count(s.params), f"{s.flops_per_token:.3g}",
                         compare_lib.format_count(s.tokens_per_s), compare_lib.format_count(s.tokens),
                         f"{s.ratio:.3g}", str(int(s.tokens // batch_tokens)), marks.get(s, "")] for s in shapes]
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if c in (0, len(header) - 1) else cell.rjust(w)
                               for c, (cell, w) in enumerate(zip(line, widths))).rstrip() for line in lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.plan", description=__doc__.split("\n")[0])
    parser.add_argument("--budget_hours", type=float, default=3.0, help="training time (default 3, the hackathon)")
    parser.add_argument("--device", default="a100", help=f"one of {', '.join(sorted(hardware.PEAK_FLOPS))}")
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation to assume (default 0.4)")
    speed.add_argument("--measured", default=None, metavar="RUN",
                       help="a run's workdir: plan at the model FLOP/s it achieved (its median tokens_per_s)")
    parser.add_argument("--stage", default=None, help="with --measured: the stage of a multi-stage run (pretrain)")
    parser.add_argument("--seq_len", type=int, default=None, help="sequence length (default: the base config's, 512)")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype: its matmul precision picks the peak")
    parser.add_argument("--head_dim", type=int, default=64, choices=(64, 128),
                        help="head size (64: the winner's; FLOPs do not depend on it at a fixed width)")
    parser.add_argument("--config", default=None,
                        help="config file whose model section is the base (default: the measured run's, else "
                             "jaxllm's defaults: vocab 50304, SwiGLU)")
    parser.add_argument("--target_ratio", type=float, default=WINNER_RATIO,
                        help=f"tokens per parameter of the recommendation (default {WINNER_RATIO:g}, the 2024 "
                             f"winner's; {CHINCHILLA_RATIO:g} = Chinchilla)")
    parser.add_argument("--batch_tokens", type=int, default=None,
                        help="tokens per optimizer step, for train.steps (default 64 x 4 sequences, the winner's)")
    parser.add_argument("--depths", default=",".join(map(str, DEPTHS)), help="depths to try, comma-separated")
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)), help="widths to try, comma-separated")
    parser.add_argument("--all", action="store_true", help=f"list every shape, not only width/depth in {ASPECT}")
    args = parser.parse_args(argv)
    if args.mfu is not None and not 0 < args.mfu <= 1:
        parser.error(f"--mfu is {args.mfu}; it must be in (0, 1]")
    if args.budget_hours <= 0 or args.target_ratio <= 0:
        parser.error("--budget_hours and --target_ratio must be > 0")
    try:
        args.depths = [int(d) for d in args.depths.split(",") if d.strip()]
        args.widths = [int(w) for w in args.widths.split(",") if w.strip()]
    except ValueError:
        parser.error("--depths and --widths are comma-separated integers, e.g. --depths 4,8,12")
    if not args.depths or not args.widths or min(args.depths + args.widths) <= 0:
        parser.error("--depths and --widths need at least one positive integer each")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        budget_s = args.budget_hours * 3600.0
        peak, precision = device_peak(args.device, args.dtype)
        measured = None
        if args.measured:
            flops_per_s, measured = measured_flops(args.measured, args.stage)
            speed = (f"the {flops_per_s:.3g} FLOP/s {args.measured} achieved (median "
                     f"{compare_lib.format_count(measured['tokens_per_s'])} tokens/s x "
                     f"{measured['flops_per_token']:.3g} FLOPs/token; {flops_per_s / peak:.3g} of one "
                     f"{args.device}'s {precision} peak)")
        else:
            mfu = 0.4 if args.mfu is None else args.mfu
            flops_per_s = peak * mfu
            speed = f"one {args.device}'s {precision} peak {peak / 1e12:.4g} TFLOP/s x MFU {mfu:g}"
        if args.config:
            base = config_lib.load_config(args.config).model
        elif measured is not None:
            base = measured["model"]
        else:
            base = config_lib.default_config().model
        if base.name != "llama":
            raise ConfigError(f"the planner sizes llama models; the base model is {base.name}")
        seq_len = args.seq_len or base.sequence_length
        base = ml_collections.ConfigDict(base.to_dict())
        base.sequence_length = seq_len
        batch_tokens = args.batch_tokens or 64 * 4 * seq_len
        shapes = with_budget(shape_costs(base, args.depths, args.widths, args.head_dim), budget_s, flops_per_s)
    except (ConfigError, compare_lib.CompareError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    picks = {"Chinchilla": recommend(shapes, CHINCHILLA_RATIO), "winner": recommend(shapes, WINNER_RATIO),
             "target": recommend(shapes, args.target_ratio)}
    marks: dict[Shape, str] = {}
    for label, shape in (("<- Chinchilla ~20:1", picks["Chinchilla"]), ("<- 2024 winner ~6:1", picks["winner"]),
                         (f"<- recommended ({args.target_ratio:g}:1)", picks["target"])):
        marks[shape] = f"{marks[shape]}, {label[3:]}" if shape in marks else label
    listed = shapes if args.all else [s for s in shapes if ASPECT[0] <= s.aspect <= ASPECT[1]] or shapes
    print(f"budget: {args.budget_hours:g} h at {speed} = {budget_s * flops_per_s:.3g} FLOPs")
    print(f"shapes: llama, vocab {base.vocab_size}, sequence {seq_len}, head size {args.head_dim}, "
          f"{'tied' if base.tie_embeddings else 'untied'} head; params include the embedding; FLOPs/token from "
          f"jaxllm.models.flops_per_token; steps at {batch_tokens} tokens/step"
          + ("" if args.all else f"; width/depth in [{ASPECT[0]:g}, {ASPECT[1]:g}] (--all: every shape)"))
    print(table(listed, marks, batch_tokens))
    print(f"rule: among shapes with width/depth in [{ASPECT[0]:g}, {ASPECT[1]:g}] and tokens/param within "
          f"{TOLERANCE:.0%} of the target, the widest (then the closest); none that close: the closest (log scale). "
          f"Every shape is assumed to reach the same MFU")
    for label, ratio, shape in (("Chinchilla, ~20 tokens/param", CHINCHILLA_RATIO, picks["Chinchilla"]),
                                ("2024 winner, ~6 tokens/param (1.08B tokens, 180M params)", WINNER_RATIO,
                                 picks["winner"])):
        print(f"  {label}: {shape.name} ({compare_lib.format_count(shape.params)} params, "
              f"{compare_lib.format_count(shape.tokens)} tokens, {shape.ratio:.1f}:1)")
    best = picks["target"]
    print(f"recommended at {args.target_ratio:g} tokens/param: {best.name}, {compare_lib.format_count(best.params)} "
          f"params, {compare_lib.format_count(best.tokens)} tokens ({best.ratio:.1f}:1)")
    print(f"  {overrides(best, base, args.seq_len, int(best.tokens // batch_tokens))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
