"""Compare finished (or running) runs: `python -m jaxllm.compare RUN_A RUN_B ... [--stage S] [--out compare.png]`.

Each RUN is a workdir. A single-stage run keeps its metrics.jsonl in the workdir itself; a multi-stage run
(`stages="pretrain,finetune"`) in `RUN/pretrain`, `RUN/finetune`, and `--stage` picks which (default pretrain).
It prints one table, a row per run:

- final val loss: the full validation pass at the end when the run made one (`full` rows, marked `full`),
  else its last (sampled) validation loss;
- tokens: real tokens trained on (`tokens_seen` of the last train row), and steps;
- wall time: `elapsed_s` of the last train row (seconds since the run began, across resumes: compilation,
  evaluations and checkpoints included);
- tokens/s: the median of the train rows' `tokens_per_s` (steady-state throughput, compilation left out);
- reaches A's loss at: the wall time at which the run's validation loss first reached the first run's final
  one (the equal-loss comparison; "-" if it never did). Like is compared with like: the first run's last
  sampled validation loss against the others' sampled ones (every run evaluates the same fixed validation
  batches, `train.eval_batches`), and only when the first run has no sampled row its full pass against the
  others' full passes. A full pass averages over windows the sample leaves out, so setting a sampled loss
  against it would credit or handicap a run by the sample's difficulty (on textmix the 16 sampled batches
  sit ~0.05 nats below the full pass).

and draws one PNG of 2 x 2 panels: validation loss (top) and training loss (bottom) against tokens (left) and
against wall-clock time (right), a line per run, labelled by its folder name (a star: the full validation
pass at the end). A validation row holds no
tokens or time of its own: both are read off the train rows at its step (linear interpolation over steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import statistics
import sys
from typing import Any

import numpy as np

from jaxllm import curves
from jaxllm.metrics import read_metrics


class CompareError(ValueError):
    """A run folder that cannot be compared, described in one sentence for the user."""


def stage_dir(run: str | pathlib.Path, stage: str | None = None) -> pathlib.Path:
    """The folder holding the metrics.jsonl of `run`'s stage `stage` (None: the run itself if single-stage,
    else its pretrain stage). A single-stage run is its own pretrain stage."""
    run = pathlib.Path(run)
    if not run.is_dir():
        raise CompareError(f"{run} is not a folder; give the workdir of a run (the --workdir of jaxllm.train)")
    here = (run / "metrics.jsonl").is_file()
    if here and stage in (None, "pretrain"):
        return run
    wanted = stage or "pretrain"
    if (run / wanted / "metrics.jsonl").is_file():
        return run / wanted
    stages = sorted(p.name for p in run.iterdir() if (p / "metrics.jsonl").is_file())
    if here or stages:
        found = ", ".join(["(the run itself, a single-stage run)"] * here + stages)
        raise CompareError(f"{run} has no {wanted} stage with metrics.jsonl; it has: {found}; choose with --stage")
    raise CompareError(f"{run} holds no metrics.jsonl (nor a stage folder with one); is it a jaxllm workdir?")


def load_rows(folder: str | pathlib.Path) -> list[dict[str, Any]]:
    """The rows of `folder`/metrics.jsonl (CompareError when it is missing)."""
    path = pathlib.Path(folder) / "metrics.jsonl"
    if not path.is_file():
        raise CompareError(f"{path} does not exist; is {folder} a jaxllm run folder?")
    return read_metrics(path)


@dataclasses.dataclass
class RunSummary:
    """What the table shows of one run (stage); None where the rows do not say."""

    name: str
    steps: int | None
    tokens: int | None
    wall_s: float | None
    tokens_per_s: float | None
    first_val_loss: float | None  # the first validation loss logged (not the full pass)
    final_val_loss: float | None  # the full pass at the end if made, else the last validation loss
    final_val_full: bool


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _val_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The validation rows with a finite loss, sampled and full passes alike, in order."""
    return [r for r in rows if r.get("split") == "val" and _finite(r.get("loss"))]


def summarize(rows: list[dict[str, Any]], name: str) -> RunSummary:
    """The table's row of a run from its metrics.jsonl `rows` (see the module docstring)."""
    train = [r for r in rows if r.get("split") == "train"]
    val = _val_rows(rows)
    sampled = [r for r in val if not r.get("full")]
    full = [r for r in val if r.get("full")]
    last_step = max((r["step"] for r in train + val), default=None)
    final = full[-1] if full and full[-1]["step"] == last_step else (val[-1] if val else None)
    rates = [r["tokens_per_s"] for r in train if _finite(r.get("tokens_per_s"))]
    return RunSummary(
        name=name, steps=last_step,
        tokens=train[-1].get("tokens_seen") if train else None,
        wall_s=train[-1].get("elapsed_s") if train and _finite(train[-1].get("elapsed_s")) else None,
        tokens_per_s=statistics.median(rates) if rates else None,
        first_val_loss=sampled[0]["loss"] if sampled else (val[0]["loss"] if val else None),
        final_val_loss=final["loss"] if final else None,
        final_val_full=bool(final and final.get("full")))


def at_steps(rows: list[dict[str, Any]], key: str, steps: list[float]) -> list[float] | None:
    """`key` of the train rows (tokens_seen, elapsed_s) at `steps`, interpolated linearly over steps; None
    when no train row holds it."""
    known = [(r["step"], r[key]) for r in rows if r.get("split") == "train" and _finite(r.get(key))]
    if not known:
        return None
    return list(np.interp(steps, [s for s, _ in known], [v for _, v in known]))


def reach_target(rows: list[dict[str, Any]]) -> tuple[float, bool] | None:
    """(loss, full) the other runs must reach: the last sampled validation loss of `rows`, else (a run with
    only full passes) its last full one; None when it has no validation loss."""
    val = _val_rows(rows)
    sampled = [r for r in val if not r.get("full")]
    if sampled:
        return sampled[-1]["loss"], False
    return (val[-1]["loss"], True) if val else None


def time_to_loss(rows: list[dict[str, Any]], target: float, full: bool = False) -> float | None:
    """Wall seconds at the first validation row (sampled ones, or with `full` the full passes) whose loss is
    <= `target` (None: never, or no times)."""
    val = [r for r in _val_rows(rows) if bool(r.get("full")) == full]
    hit = next((r for r in val if r["loss"] <= target), None)
    if hit is None:
        return None
    times = at_steps(rows, "elapsed_s", [hit["step"]])
    return times[0] if times else None


def format_count(n: float | None) -> str:
    """1234567 -> '1.23M'."""
    if n is None:
        return "-"
    for size, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def format_seconds(seconds: float | None) -> str:
    """75 -> '1m15s', 3725 -> '1h02m', 4.2 -> '4.2s'."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def table(summaries: list[RunSummary], reach_s: list[float | None] | None = None) -> str:
    """The comparison table: a header and a line per run; `reach_s`: each run's time to the first run's
    final val loss (a column when given)."""
    header = ["run", "final val loss", "steps", "tokens", "wall time", "tokens/s"]
    if reach_s is not None:
        header.append("reaches first's loss at")
    lines = [header]
    for i, s in enumerate(summaries):
        loss = "-" if s.final_val_loss is None else f"{s.final_val_loss:.4f}" + (" (full)" if s.final_val_full else "")
        line = [s.name, loss, "-" if s.steps is None else str(s.steps), format_count(s.tokens),
                format_seconds(s.wall_s), format_count(s.tokens_per_s)]
        if reach_s is not None:
            line.append(format_seconds(reach_s[i]))
        lines.append(line)
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in
                               enumerate(zip(line, widths))).rstrip() for line in lines)


def _time_unit(max_seconds: float) -> tuple[float, str]:
    if max_seconds > 2 * 3600:
        return 3600.0, "hours"
    if max_seconds > 120:
        return 60.0, "minutes"
    return 1.0, "seconds"


def _clip_top(ax, values: list[float]) -> None:
    """Let the first, steep drop of a loss run off the top so the rest of the curves fill the panel."""
    if len(values) < 2:
        return
    low, high = min(values), float(np.quantile(values, 0.9))
    if high > low:
        ax.set_ylim(low - 0.05 * (high - low), high + 0.15 * (high - low))


def draw(runs: list[tuple[str, list[dict[str, Any]]]], path: str | pathlib.Path) -> pathlib.Path:
    """The 2 x 2 PNG of the module docstring for `runs` ([(label, metrics rows)]); returns its path."""
    max_s = max((r.get("elapsed_s") or 0.0 for _, rows in runs for r in rows if r.get("split") == "train"),
                default=0.0)
    unit_s, unit = _time_unit(max_s)
    fig = curves.new_figure(figsize=(12, 8))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.07, top=0.93, wspace=0.15, hspace=0.25)
    axes = fig.subplots(2, 2, sharey="row")
    plotted = {"val": [], "train": []}
    for i, (label, rows) in enumerate(runs):
        color = f"C{i % 10}"
        for row, split, full, style in ((0, "val", False, "o-"), (0, "val", True, "*"), (1, "train", False, "-")):
            steps, losses = curves.series(rows, split, "loss", full=full)
            plotted[split] += losses
            tokens = at_steps(rows, "tokens_seen", steps)
            seconds = at_steps(rows, "elapsed_s", steps)
            kwargs = dict(color=color, lw=1.2 if split == "val" else 0.8, ms=10 if full else 3,
                          label=None if full else label)
            if style == "-" and len(steps) < 50:  # a short run's points stay visible
                kwargs["marker"] = "."
            if tokens is not None and steps:
                axes[row, 0].plot(tokens, losses, style, **kwargs)
            if seconds is not None and steps:
                axes[row, 1].plot(np.asarray(seconds) / unit_s, losses, style, **kwargs)
    for row, split in ((0, "val"), (1, "train")):
        axes[row, 0].set(xlabel="tokens", ylabel=f"{'validation' if split == 'val' else 'training'} loss")
        axes[row, 1].set(xlabel=f"wall-clock time ({unit})")
        _clip_top(axes[row, 0], plotted[split])
        for ax in axes[row]:
            ax.grid(alpha=0.3)
    axes[0, 0].legend()
    fig.suptitle("validation (top) and training (bottom) loss against tokens and wall-clock time")
    path = pathlib.Path(path)
    fig.savefig(path, dpi=90)
    return path


def labels(runs: list[str | pathlib.Path]) -> list[str]:
    """A label per run: its folder name, or its last two path parts where two runs share a name."""
    names = [pathlib.Path(run).resolve().name for run in runs]
    if len(set(names)) == len(names):
        return names
    return ["/".join(pathlib.Path(run).resolve().parts[-2:]) for run in runs]


def compare(runs: list[str | pathlib.Path], *, stage: str | None = None,
            out: str | pathlib.Path | None = "compare.png") -> tuple[str, pathlib.Path | None]:
    """(the table, the PNG's path or None when `out` is None) of `runs` (workdirs) at stage `stage`."""
    folders = [stage_dir(run, stage) for run in runs]
    rows = [load_rows(folder) for folder in folders]
    names = labels(runs)
    summaries = [summarize(r, name) for r, name in zip(rows, names)]
    target = reach_target(rows[0])
    reach = [time_to_loss(r, *target) for r in rows] if target is not None and len(runs) > 1 else None
    text = table(summaries, reach)
    return text, (draw(list(zip(names, rows)), out) if out is not None else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.compare", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run workdirs (the first is the reference for the last column)")
    parser.add_argument("--stage", default=None, help="stage of multi-stage runs: pretrain (default) or finetune")
    parser.add_argument("--out", default="compare.png", help="the PNG to write (default compare.png)")
    args = parser.parse_args(argv)
    try:
        text, path = compare(args.runs, stage=args.stage, out=args.out)
    except CompareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(text)
    print(f"curves: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
