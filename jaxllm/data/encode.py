"""Documents -> token ids, bad rows counted instead of crashing, in this process or in worker processes.

`encode_documents(tokenizer, texts)` returns one uint16 array, every kept document's ids followed by the
end-of-text id, and the counts of what it had to do:

    documents        kept documents
    null             skipped: the value is None (a null in parquet/jsonl)
    not_text         skipped: the value is not a string
    empty            skipped: "" or whitespace only (it would add nothing but an end-of-text)

`encode_in_order(tokenizer, chunks, num_proc)` does that over chunks of documents and yields the results in
input order. With num_proc > 1 the workers come from a "forkserver" context ("spawn" where there is none):
never a fork of this process, which may be running JAX's threads (a forked copy of a multithreaded
process can deadlock, and JAX warns about exactly that). The texts travel to the workers and the ids back
through multiprocessing's pipes; nothing is read from files with pickle. This module imports only numpy,
so a worker starts in a fraction of a second.
"""

from __future__ import annotations

import collections
import multiprocessing
from collections.abc import Iterable, Iterator

import numpy as np

TOKEN_DTYPE = np.uint16
SKIPPED = ("null", "not_text", "empty")
START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
IN_FLIGHT_PER_WORKER = 2  # chunks queued per worker: enough to keep them busy, few enough to bound memory


def encode_documents(tokenizer, texts: list) -> tuple[np.ndarray, dict[str, int]]:
    """uint16 [n_tokens] ids of the usable documents of `texts`, each + end-of-text; and the counts above."""
    counts = dict.fromkeys(("documents",) + SKIPPED, 0)
    kept = []
    for text in texts:
        if text is None:
            counts["null"] += 1
        elif not isinstance(text, str):
            counts["not_text"] += 1
        elif not text or text.isspace():
            counts["empty"] += 1
        else:
            kept.append(text)
    counts["documents"] = len(kept)
    docs = tokenizer.encode_batch(kept)
    ids = np.empty(sum(len(doc) + 1 for doc in docs), dtype=TOKEN_DTYPE)
    end = 0
    for doc in docs:
        ids[end:end + len(doc)] = doc
        ids[end + len(doc)] = tokenizer.eot_id
        end += len(doc) + 1
    return ids, counts


_worker_tokenizer = None  # set once per worker process by _start_worker


def _start_worker(tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_in_worker(texts: list) -> tuple[np.ndarray, dict[str, int]]:
    return encode_documents(_worker_tokenizer, texts)


def encode_in_order(tokenizer, chunks: Iterable[list], num_proc: int) -> Iterator[tuple[np.ndarray, dict]]:
    """`encode_documents` of each chunk, in order; in `num_proc` forkserver/spawn workers when num_proc > 1.

    At most IN_FLIGHT_PER_WORKER * num_proc chunks are in flight, so memory stays bounded however many
    chunks there are. Closing the iterator early stops the workers.
    """
    if num_proc <= 1:
        for texts in chunks:
            yield encode_documents(tokenizer, texts)
        return
    context = multiprocessing.get_context(START_METHOD)
    with context.Pool(num_proc, initializer=_start_worker, initargs=(tokenizer,)) as pool:
        pending = collections.deque()
        for texts in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (texts,)))
            if len(pending) >= IN_FLIGHT_PER_WORKER * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
