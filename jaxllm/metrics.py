"""Where metrics go: one JSON object per line in `metrics.jsonl`, and the same scalars to TensorBoard."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

from tensorboardX import SummaryWriter


def read_metrics(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file."""
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]


class MetricsWriter:
    """Appends rows `{"step", "split", ...scalars}` to metrics.jsonl and TensorBoard (`split/name` tags).

    Resuming at step `resume_step` drops the rows a killed run wrote after its last checkpoint, so the file
    reads as if the run had never stopped.
    """

    def __init__(self, workdir: str | pathlib.Path, resume_step: int | None = None):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        if self.path.exists():
            keep = [] if resume_step is None else [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        self._file = open(self.path, "a")
        self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

    def write(self, step: int, split: str, scalars: dict[str, Any], tag: str | None = None) -> dict[str, Any]:
        """Append one row; TensorBoard tags are `{tag or split}/{name}`. Returns the row as written."""
        row = {"step": int(step), "split": split}
        row.update({name: _plain(value) for name, value in scalars.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for name, value in row.items():
            if (name not in ("step", "split") and isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value)):
                self._tb.add_scalar(f"{tag or split}/{name}", value, step)
        return row

    def flush(self) -> None:
        self._file.flush()
        self._tb.flush()

    def close(self) -> None:
        self._file.close()
        self._tb.close()


def _plain(value):
    """A JSON-friendly Python scalar from a numpy/jax scalar."""
    if hasattr(value, "item"):
        value = value.item()
    return value
