"""Pictures of a run: `curves.png` in each stage's workdir (training and validation loss, learning rate, by step).

`write_curves` is what a stage calls when it ends (jaxllm/stage.py, at the end and on a signal stop). Drawing
is a convenience, never a reason to lose a run: any failure (matplotlib missing, a full disk, rows without a
loss) is one warning line on stderr and the run goes on. Matplotlib renders with Agg into a file, touching no
display and no pyplot state. `python -m jaxllm.curves WORKDIR` draws it again from the workdir's metrics.jsonl.
"""

from __future__ import annotations

import math
import pathlib
import sys
from typing import Any, Iterable

FILENAME = "curves.png"


def new_figure(**kwargs):
    """A matplotlib Figure not registered with pyplot: nothing global changes (a caller's backend stays as it
    was, no display is needed) and it is freed when dropped; `savefig` renders a PNG with Agg."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def series(rows: Iterable[dict[str, Any]], split: str, key: str, x: str = "step",
           full: bool | None = False) -> tuple[list[float], list[float]]:
    """([x], [key]) of the rows of `split` that hold a finite `key` and `x`; `full`: only full evaluations
    (True), only the others (False), or both (None)."""
    xs, ys = [], []
    for row in rows:
        if row.get("split") != split or (full is not None and bool(row.get("full")) != full):
            continue
        value, at = row.get(key), row.get(x)
        if isinstance(value, (int, float)) and isinstance(at, (int, float)) and math.isfinite(value):
            xs.append(float(at))
            ys.append(float(value))
    return xs, ys


def draw_curves(rows: list[dict[str, Any]], path: str | pathlib.Path, title: str = "") -> pathlib.Path:
    """Draw loss (train, val, full val) and learning rate against step from metrics.jsonl `rows` into the
    PNG `path`; returns the path."""
    fig = new_figure(figsize=(11, 4))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.9, wspace=0.25)  # fixed: a layout engine costs 0.1 s
    loss_ax, lr_ax = fig.subplots(1, 2, width_ratios=(2, 1))
    train_steps, train_losses = series(rows, "train", "loss")
    few = "." if len(train_steps) < 50 else None  # a short run's points stay visible
    loss_ax.plot(train_steps, train_losses, lw=1, marker=few, label="train loss")
    loss_ax.plot(*series(rows, "val", "loss"), "o-", ms=3, label="val loss")
    full_steps, full_losses = series(rows, "val", "loss", full=True)
    if full_steps:
        loss_ax.plot(full_steps, full_losses, "*", ms=10, label="val loss (full)")
    loss_ax.set(xlabel="step", ylabel="loss (nats/token)")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend()
    lr_ax.plot(*series(rows, "train", "lr"), lw=1, marker=few, color="tab:green")
    lr_ax.set(xlabel="step", ylabel="learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    lr_ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    path = pathlib.Path(path)
    fig.savefig(path, dpi=90)
    return path


def write_curves(workdir: str | pathlib.Path, rows: list[dict[str, Any]] | None = None) -> pathlib.Path | None:
    """`workdir/curves.png` from `rows` (default: workdir/metrics.jsonl); on any failure a one-line warning on
    stderr and None, never an exception: a picture must not fail a run."""
    workdir = pathlib.Path(workdir)
    try:
        if rows is None:
            from jaxllm.metrics import read_metrics

            rows = read_metrics(workdir / "metrics.jsonl")
        return draw_curves(rows, workdir / FILENAME, title="/".join(workdir.resolve().parts[-2:]))
    except Exception as error:  # noqa: BLE001 -- any failure to draw is a warning, by design
        print(f"warning: could not draw {workdir / FILENAME} ({type(error).__name__}: {error}); the run is "
              f"unaffected", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m jaxllm.curves",
                                     description="Draw WORKDIR/curves.png from WORKDIR/metrics.jsonl.")
    parser.add_argument("workdir", nargs="+", help="stage workdirs (folders holding metrics.jsonl)")
    args = parser.parse_args(argv)
    written = [write_curves(workdir) for workdir in args.workdir]
    for path in written:
        if path is not None:
            print(path)
    return 0 if all(written) else 1


if __name__ == "__main__":
    sys.exit(main())
