"""Documents -> token memmaps: `train.bin` and `val.bin` of concatenated uint16 token ids, like nanoGPT.

Every document is `tokenizer.encode(text)` followed by one end-of-text id (no BOS, no masking across
documents), exactly the reference's layout. The output directory is
`<cache>/prepared/<16 hex digits of a hash of (source fingerprint, tokenizer, format version)>` and holds

    train.bin, val.bin   np.uint16 [n_tokens] each
    meta.json            fingerprint, tokenizer name/n_vocab/eot_id, token and document counts per split,
                         and "problems": the bad rows skipped or repaired, per file and per split

Bad rows never stop preparation: broken JSON lines, rows without the text field or with a non-string
value, nulls, empty documents are skipped; invalid UTF-8 and lone surrogates are repaired (U+FFFD, "?").
Each is counted in meta.json's "problems" and summed up in one line on stderr (see sources.py and
encode.py for the kinds). A file that cannot be read at all (a 0-byte or truncated parquet) is a DataError
naming it: skipping a whole shard would silently train on less data.

Preparation is atomic: everything is written into `<dir>.tmp-<pid>` (token files front to back, fsynced,
meta.json last) and renamed into place, so a killed run or a full disk leaves nothing that looks finished;
a finished directory is reused without re-tokenizing. A full disk is a DataError, and the next run redoes
the work. Tokenizer workers (data.num_proc) are never forked from this process (see encode.py).

Run alone: `python -m jaxllm.data.prepare --config configs/X.py [--config.data.path=...]`.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import json
import math
import os
import pathlib
import shutil
import sys

import datasets
import numpy as np
from tqdm import tqdm

from jaxllm import distributed, tokenizer as tokenizer_lib
from jaxllm.data import encode, sources
from jaxllm.data.sources import DataError, read_documents, source_fingerprint

FORMAT_VERSION = 2  # 2: empty documents skipped, bad rows counted in meta.json's "problems"
SPLITS = ("train", "val")
TOKEN_DTYPE = encode.TOKEN_DTYPE
SMALL_DATASET = 1000  # below this many documents a single process beats the start-up cost of workers
CHUNK_DOCUMENTS = 1000  # documents per unit of work (and per step of the progress bar)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # EFBIG: over a file size limit (RLIMIT_FSIZE)


def fingerprint(data_cfg, tokenizer) -> dict:
    """Everything that decides the prepared token files."""
    tok = {"name": tokenizer.name, "n_vocab": tokenizer.n_vocab, "eot_id": tokenizer.eot_id}
    if getattr(tokenizer, "digest", None):  # hf: which tokenizer.json (gpt2/byte keep their old keys)
        tok["digest"] = tokenizer.digest
    return {"format_version": FORMAT_VERSION, "source": source_fingerprint(data_cfg), "tokenizer": tok}


def prepared_dir(data_cfg, tokenizer, cache_dir: str | None = None) -> pathlib.Path:
    """Where `prepare` puts (or finds) the token files of this data config and tokenizer."""
    root = pathlib.Path(cache_dir or data_cfg.cache_dir or tokenizer_lib.cache_dir()).expanduser()
    key = json.dumps(fingerprint(data_cfg, tokenizer), sort_keys=True)
    return root / "prepared" / hashlib.sha256(key.encode()).hexdigest()[:16]


def read_meta(directory: pathlib.Path) -> dict | None:
    """The meta.json of a finished prepared directory, or None when it is missing or unreadable."""
    try:
        return json.loads((pathlib.Path(directory) / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _is_done(directory: pathlib.Path, expected: dict) -> bool:
    meta = read_meta(directory)
    if meta is None or meta.get("fingerprint") != expected:
        return False
    item = np.dtype(TOKEN_DTYPE).itemsize
    return all((directory / f"{split}.bin").is_file()
               and (directory / f"{split}.bin").stat().st_size == meta["tokens"][split] * item for split in SPLITS)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(directory: pathlib.Path, expected: dict) -> None:
    """Delete temp dirs of dead (or this) processes and an unfinished `directory` left by older code."""
    for tmp in directory.parent.glob(f"{directory.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
    if directory.exists() and not _is_done(directory, expected):
        shutil.rmtree(directory)


@contextlib.contextmanager
def _datasets_progress(enabled: bool):
    """Show or hide datasets' own progress bars for the duration, restoring the previous setting."""
    was_disabled = datasets.are_progress_bars_disabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.disable_progress_bars if was_disabled else datasets.enable_progress_bars)()


def _write_synced(file: pathlib.Path, data: bytes) -> None:
    with open(file, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _write_tokens(docs: datasets.Dataset, tokenizer, file: pathlib.Path, split: str, num_proc: int,
                  progress: bool) -> dict[str, int]:
    """Tokenize the "text" column of `docs` into `file` (uint16, front to back, fsynced).

    Returns the counts of `encode.encode_documents` summed over the split, plus "tokens".
    Plain sequential writes, not a memmap: a memmap store that finds the disk full kills the process
    with SIGBUS, where a write raises OSError.
    """
    totals = collections.Counter(dict.fromkeys(("tokens", "documents") + encode.SKIPPED, 0))
    chunks = (batch["text"] for batch in docs.iter(batch_size=CHUNK_DOCUMENTS))
    with open(file, "wb") as out, contextlib.closing(encode.encode_in_order(tokenizer, chunks, num_proc)) as parts:
        for ids, counts in tqdm(parts, total=math.ceil(len(docs) / CHUNK_DOCUMENTS), desc=f"tokenizing {split}",
                                disable=not progress):
            out.write(ids.tobytes())
            totals.update(counts)
            totals["tokens"] += len(ids)
        out.flush()
        os.fsync(out.fileno())
    if totals["tokens"] == 0:
        raise DataError(f"the {split} split has no usable documents ({_describe(totals, encode.SKIPPED)} skipped "
                        f"of {len(docs)}); check the data source and --config.data.text_field")
    return dict(totals)


def _describe(counts: dict, kinds) -> str:
    return ", ".join(f"{counts[kind]} {kind}" for kind in kinds if counts.get(kind)) or "none"


def problems_summary(meta: dict) -> str:
    """One line summing up meta.json's "problems" (bad rows skipped or repaired), or "" when there were none."""
    problems = meta.get("problems", {})
    totals = collections.Counter()
    for counts in [*problems.get("files", {}).values(), *(problems.get(split, {}) for split in SPLITS)]:
        totals.update(counts)
    skipped = {kind: n for kind, n in totals.items() if kind not in sources.REPAIRED}
    repaired = {kind: n for kind, n in totals.items() if kind in sources.REPAIRED}
    if not skipped and not repaired:
        return ""
    parts = []
    if skipped:
        parts.append(f"skipped {sum(skipped.values())} bad rows ({_describe(skipped, sorted(skipped))})")
    if repaired:
        parts.append(f"repaired {sum(repaired.values())} ({_describe(repaired, sorted(repaired))})")
    return " and ".join(parts)


def prepare(data_cfg, tokenizer, cache_dir: str | None = None, progress: bool = True) -> pathlib.Path:
    """Tokenize the documents of `data_cfg` (config.data) into train.bin/val.bin; return their directory.

    Returns at once when a finished directory with the same fingerprint exists. In a multi-process run
    (jaxllm/distributed.py) process 0 prepares while the others wait, then they read its directory: no two
    processes write the same file (the cache folder must be one they share, as the workdir is).
    """
    if not distributed.is_multiprocess():
        return _prepare_here(data_cfg, tokenizer, cache_dir, progress)
    distributed.primary_first(lambda: _prepare_here(data_cfg, tokenizer, cache_dir, progress), "jaxllm-prepare")
    directory = prepared_dir(data_cfg, tokenizer, cache_dir)
    if not _is_done(directory, fingerprint(data_cfg, tokenizer)):
        raise DataError(f"process 0 did not leave prepared data in {directory} (see its error); data.cache_dir must "
                        f"be a folder every process sees")
    return directory


def _prepare_here(data_cfg, tokenizer, cache_dir: str | None, progress: bool) -> pathlib.Path:
    """`prepare` in this process alone."""
    if tokenizer.n_vocab > np.iinfo(TOKEN_DTYPE).max + 1:
        raise DataError(f"tokenizer '{tokenizer.name}' has {tokenizer.n_vocab} ids, more than uint16 token files "
                        f"hold (65536); use a tokenizer with at most 65536 ids")
    expected = fingerprint(data_cfg, tokenizer)
    directory = prepared_dir(data_cfg, tokenizer, cache_dir)
    if _is_done(directory, expected):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(directory, expected)
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir()
        with _datasets_progress(progress):
            documents, file_problems = read_documents(data_cfg)
        meta = {"fingerprint": expected, "tokenizer": tokenizer.name, "n_vocab": tokenizer.n_vocab,
                "eot_id": tokenizer.eot_id, "dtype": np.dtype(TOKEN_DTYPE).name, "format_version": FORMAT_VERSION,
                "tokens": {}, "documents": {}, "problems": {"files": file_problems}}
        for split in SPLITS:
            docs = documents[split]
            if len(docs) == 0:
                raise DataError(f"the {split} split has no documents; check the data source and data.val_split")
            num_proc = data_cfg.num_proc if len(docs) >= SMALL_DATASET else 1
            counts = _write_tokens(docs, tokenizer, tmp / f"{split}.bin", split, num_proc, progress)
            meta["tokens"][split], meta["documents"][split] = counts.pop("tokens"), counts.pop("documents")
            meta["problems"][split] = {kind: n for kind, n in counts.items() if n}
        # meta.json last: its presence is what marks a directory as finished.
        _write_synced(tmp / "meta.json", json.dumps(meta, indent=2, sort_keys=True).encode())
        try:
            os.replace(tmp, directory)
        except OSError:
            if not _is_done(directory, expected):  # another process finishing first is fine; anything else is not
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if error.errno in DISK_FULL:
            raise DataError(f"the disk is full (or a file size limit was hit) while writing the prepared tokens "
                            f"under {directory.parent} ({os.strerror(error.errno)}); nothing was kept: free space "
                            f"there or set --config.data.cache_dir to a disk with room, and run again") from error
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = problems_summary(meta)
    if summary:
        print(f"prepare: {summary}; the counts per file and split are in {directory / 'meta.json'}", file=sys.stderr)
    return directory


def main(argv: list[str] | None = None) -> int:
    """CLI: prepare the token files of a config file and print where they are; 2 on a user error."""
    from jaxllm.config import ConfigError, load_config

    argv = sys.argv[1:] if argv is None else argv
    config_path, overrides = None, []
    args = iter(argv)
    try:
        for arg in args:
            if arg == "--config":
                config_path = next(args, None)
            elif arg.startswith("--config="):
                config_path = arg.split("=", 1)[1]
            elif arg.startswith("--config."):
                overrides.append(arg[len("--config."):])
            else:
                raise ConfigError(f"unknown argument '{arg}'; usage: python -m jaxllm.data.prepare --config FILE "
                                  f"[--config.data.FIELD=VALUE ...]")
        if not config_path:
            raise ConfigError("no config given; usage: python -m jaxllm.data.prepare --config configs/X.py")
        config = load_config(config_path, overrides)
        tok = tokenizer_lib.get_tokenizer(config.data.tokenizer, config.data.tokenizer_path)
        directory = prepare(config.data, tok, progress=config.train.progress)
    except (ConfigError, DataError, tokenizer_lib.TokenizerError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    meta = read_meta(directory)
    print(directory)
    for split in SPLITS:
        print(f"{split}: {meta['tokens'][split]:,} tokens in {meta['documents'][split]:,} documents")
    summary = problems_summary(meta)
    if summary:
        print(f"data problems: {summary} (see meta.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
