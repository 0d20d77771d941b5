"""Token memmaps -> batches, with the window order a pure function of (seed, step).

A split of N tokens is cut into `num_windows(N, L) = (N - 1) // L` non-overlapping windows at offsets that
are multiples of L; window w gives inputs tokens[w*L : w*L+L] and targets tokens[w*L+1 : w*L+L+1]
(the reference's layout; documents are not masked from each other).

Training sample s = step * batch_size + j reads window permutation(seed, epoch)[s % n_windows] with
epoch = s // n_windows: every window once per epoch, in a fresh seeded order each epoch. Nothing else is
state, so a run resumed at step k draws exactly the batches an uninterrupted run would.

Every batch is a dict of numpy arrays:
    inputs  int32   [B, L]  token ids
    targets int32   [B, L]  the next token of each input position
    weights float32 [B, L]  1 for real windows, 0 for padding rows (evaluation only)
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Iterator

import numpy as np

from jaxllm.data.sources import DataError

TOKEN_DTYPE = np.uint16


def open_tokens(path) -> np.memmap:
    """The uint16 token ids of a prepared split file (read-only memmap, shape [n_tokens])."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"the token file {path} does not exist; run `python -m jaxllm.data.prepare --config ...` first")
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def num_windows(n_tokens: int, seq_len: int) -> int:
    """How many full (inputs, targets) windows of length seq_len fit in n_tokens tokens."""
    return max(0, (int(n_tokens) - 1) // seq_len)


def _check_length(tokens, seq_len: int, split: str) -> int:
    if len(tokens) < seq_len + 1:
        raise DataError(f"the {split} split has {len(tokens)} tokens, fewer than sequence_length + 1 = {seq_len + 1}; "
                        f"use a shorter --config.model.sequence_length or more data")
    return num_windows(len(tokens), seq_len)


@functools.lru_cache(maxsize=2)  # this epoch and the next: a batch can straddle them
def window_permutation(seed: int, epoch: int, n_windows: int) -> np.ndarray:
    """The (read-only) order of windows in `epoch`: a permutation of 0..n_windows-1, int64 [n_windows]."""
    order = np.random.default_rng([seed, epoch]).permutation(n_windows)
    order.flags.writeable = False  # cached and shared between calls
    return order


def _make_batch(tokens, windows: np.ndarray, batch_size: int, seq_len: int) -> dict:
    """Gather `windows` (int [n <= batch_size]) into a batch, zero-padded with weight 0 to batch_size rows."""
    n = len(windows)
    rows_BxL1 = np.zeros((batch_size, seq_len + 1), dtype=np.int32)
    if n:
        offsets_nxL1 = windows[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
        rows_BxL1[:n] = tokens[offsets_nxL1]
    weights_BxL = np.zeros((batch_size, seq_len), dtype=np.float32)
    weights_BxL[:n] = 1.0
    return {"inputs": np.ascontiguousarray(rows_BxL1[:, :-1]), "targets": np.ascontiguousarray(rows_BxL1[:, 1:]),
            "weights": weights_BxL}


def train_windows(n_windows: int, *, seed: int, step: int, batch_size: int) -> np.ndarray:
    """The window ids (int64 [batch_size]) of training step `step`, without replacement within each epoch."""
    samples = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epochs, positions = np.divmod(samples, n_windows)
    windows = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):  # a batch may straddle two epochs
        where = epochs == epoch
        windows[where] = window_permutation(seed, int(epoch), n_windows)[positions[where]]
    return windows


def train_batch(tokens, *, seed: int, step: int, batch_size: int, seq_len: int, rows=None) -> dict:
    """Training batch `step`: inputs/targets int32 [B, L], weights float32 [B, L] (all ones).

    `rows` (int [n], positions in 0..B-1): only those rows of the batch, in that order, [n, L] (a process
    of a multi-process run builds only its own rows); None = all B.
    """
    n_windows = _check_length(tokens, seq_len, "train")
    windows = train_windows(n_windows, seed=seed, step=step, batch_size=batch_size)
    if rows is not None:
        windows = windows[np.asarray(rows, dtype=np.int64)]
    return _make_batch(tokens, windows, len(windows), seq_len)


def eval_batches(tokens, *, n_batches: int, batch_size: int, seq_len: int) -> list[dict]:
    """A fixed list of up to n_batches validation batches, windows spread evenly over the split.

    With fewer than n_batches * batch_size windows, every window is used once and the last batch is padded
    (weights 0), so fewer batches may come back.
    """
    n_windows = _check_length(tokens, seq_len, "val")
    wanted = n_batches * batch_size
    if n_windows >= wanted:
        windows = np.arange(wanted, dtype=np.int64) * n_windows // wanted  # distinct, evenly spaced
    else:
        windows = np.arange(n_windows, dtype=np.int64)
    return [_make_batch(tokens, windows[i:i + batch_size], batch_size, seq_len)
            for i in range(0, len(windows), batch_size)]


def all_eval_batches(tokens, *, batch_size: int, seq_len: int) -> Iterator[dict]:
    """Every validation window exactly once, in order; the last batch is padded (weights 0) to batch_size."""
    n_windows = _check_length(tokens, seq_len, "val")  # here, not inside the generator: fail at the call

    def batches():
        for start in range(0, n_windows, batch_size):
            windows = np.arange(start, min(start + batch_size, n_windows), dtype=np.int64)
            yield _make_batch(tokens, windows, batch_size, seq_len)

    return batches()
