"""Where metrics go: one JSON object per line in `metrics.jsonl`, and the same scalars to TensorBoard.

Both are written row by row and flushed as each row is written, so a killed run leaves them in step. A
resume at step s cuts both at s: metrics.jsonl keeps its rows up to s, and the TensorBoard events up to s
are copied into a new event file (which begins with a purge at s + 1, so a TensorBoard already showing the
old events drops them too) and the old event files are deleted.
"""

from __future__ import annotations

import json
import math
import pathlib
import socket
import struct
import time
from typing import Any, Iterator

import jax
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.record_writer import masked_crc32c

from jaxllm import distributed


def read_metrics(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file."""
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]


def read_events(directory: str | pathlib.Path) -> Iterator[Event]:
    """Every event of the TensorBoard event files in `directory`, files in name order (a record cut short by
    a kill ends its file)."""
    for path in sorted(pathlib.Path(directory).glob("*tfevents*")):
        data = path.read_bytes()
        offset = 0
        while offset + 12 <= len(data):  # uint64 length, uint32 crc of it, payload, uint32 crc of the payload
            (length,) = struct.unpack_from("<Q", data, offset)
            if offset + 12 + length + 4 > len(data):
                break
            yield Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4


class EventFile:
    """A TensorBoard event file written synchronously: an event is in the file (flushed, as a metrics.jsonl
    row is) when `add` returns. It begins with a purge of steps >= `purge_step` (TensorBoard's restart marker)."""

    def __init__(self, directory: pathlib.Path, purge_step: int):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
        self._file = open(self.path, "wb")
        self.add(Event(wall_time=time.time(), step=purge_step, file_version="brain.Event:2"))
        self.add(Event(wall_time=time.time(), step=purge_step, session_log=SessionLog(status=SessionLog.START)))

    def add(self, event: Event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", masked_crc32c(header)) + data
                         + struct.pack("<I", masked_crc32c(data)))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MetricsWriter:
    """Appends rows `{"step", "split", ...scalars}` to metrics.jsonl and TensorBoard (`split/name` tags).

    Resuming at step `resume_step` drops the rows and events a killed run wrote after its last checkpoint,
    so both read as if the run had never stopped (see the module docstring); `resume_step=None` starts both
    empty.

    `rows` holds what metrics.jsonl holds (the kept rows, then every row written), in every process.

    In a run of several processes only process 0 writes (`primary`, by default `jax.process_index() == 0`);
    the others' writer touches no file (they read the old rows before process 0 cuts them, then wait for
    it) and `write` just returns the row, so every process goes on alike.
    """

    def __init__(self, workdir: str | pathlib.Path, resume_step: int | None = None, primary: bool | None = None):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.primary = jax.process_index() == 0 if primary is None else primary
        old = read_metrics(self.path) if self.path.exists() else []
        self.rows = [] if resume_step is None else [r for r in old if r["step"] <= resume_step]
        distributed.barrier("jaxllm-metrics-read")  # everyone has read the old rows before process 0 cuts them
        if not self.primary:
            return
        if self.path.exists():
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self._file = open(self.path, "a")
        tensorboard = pathlib.Path(workdir) / "tensorboard"
        old_files = sorted(tensorboard.glob("*tfevents*"))
        kept = [] if resume_step is None else [
            event for event in read_events(tensorboard) if event.HasField("summary") and event.step <= resume_step]
        for path in old_files:
            path.unlink()
        self._tb = EventFile(tensorboard, purge_step=0 if resume_step is None else resume_step + 1)
        for event in kept:
            self._tb.add(event)

    def write(self, step: int, split: str, scalars: dict[str, Any], tag: str | None = None) -> dict[str, Any]:
        """Append one row; TensorBoard tags are `{tag or split}/{name}`. Returns the row as written."""
        row = {"step": int(step), "split": split}
        row.update({name: _plain(value) for name, value in scalars.items()})
        self.rows.append(row)
        if not self.primary:
            return row
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        values = [Summary.Value(tag=f"{tag or split}/{name}", simple_value=value) for name, value in row.items()
                  if (name not in ("step", "split") and isinstance(value, (int, float)) and not isinstance(value, bool)
                      and math.isfinite(value))]
        if values:
            self._tb.add(Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))
        return row

    def flush(self) -> None:
        if self.primary:
            self._file.flush()

    def close(self) -> None:
        if not self.primary:
            return
        self._file.close()
        self._tb.close()


def _plain(value):
    """A JSON-friendly Python scalar from a numpy/jax scalar."""
    if hasattr(value, "item"):
        value = value.item()
    return value
