"""Documents -> token memmaps: `train.bin` and `val.bin` of concatenated uint16 token ids, like nanoGPT.

Every document is `tokenizer.encode(text)` followed by one end-of-text id (no BOS, no masking across
documents), exactly the reference's layout. The output directory is
`<cache>/prepared/<16 hex digits of a hash of (source fingerprint, tokenizer, format version)>` and holds

    train.bin, val.bin   np.uint16 [n_tokens] each
    meta.json            fingerprint, tokenizer name/n_vocab/eot_id, token and document counts per split

Preparation is atomic: everything is written into `<dir>.tmp-<pid>` (meta.json last) and renamed into place,
so a killed run leaves nothing that looks finished; a finished directory is reused without re-tokenizing.

Run alone: `python -m jaxllm.data.prepare --config configs/X.py [--config.data.path=...]`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import sys

import datasets
import numpy as np
from tqdm import tqdm

from jaxllm import tokenizer as tokenizer_lib
from jaxllm.data.sources import DataError, load_splits, source_fingerprint

FORMAT_VERSION = 1
SPLITS = ("train", "val")
TOKEN_DTYPE = np.uint16
SMALL_DATASET = 1000  # below this many documents a single process beats the start-up cost of workers
MAX_SHARDS = 1024  # write in up to this many contiguous chunks (the progress bar's steps)


class _EncodeDocuments:
    """datasets.map function: {"text": [str]} -> {"ids": [[int] + [eot]], "n_tokens": [int]}.

    A class rather than a closure so it pickles for num_proc > 1 and hashes stably for datasets' cache.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch: dict) -> dict:
        eot = self.tokenizer.eot_id
        ids = [doc + [eot] for doc in self.tokenizer.encode_batch(batch["text"])]
        return {"ids": ids, "n_tokens": [len(doc) for doc in ids]}


def fingerprint(data_cfg, tokenizer) -> dict:
    """Everything that decides the prepared token files."""
    return {
        "format_version": FORMAT_VERSION,
        "source": source_fingerprint(data_cfg),
        "tokenizer": {"name": tokenizer.name, "n_vocab": tokenizer.n_vocab, "eot_id": tokenizer.eot_id},
    }


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


def _write_tokens(encoded: datasets.Dataset, file: pathlib.Path, split: str, progress: bool) -> int:
    """Concatenate the "ids" column into a uint16 memmap at `file`; returns the number of tokens."""
    n_tokens = int(np.sum(encoded.with_format("numpy")["n_tokens"], dtype=np.int64))
    if n_tokens == 0:
        raise DataError(f"the {split} split has no tokens after tokenization; check the data source")
    tokens = np.memmap(file, dtype=TOKEN_DTYPE, mode="w+", shape=(n_tokens,))
    n_shards = min(MAX_SHARDS, len(encoded))
    offset = 0
    for index in tqdm(range(n_shards), desc=f"writing {file.name}", disable=not progress):
        shard = encoded.shard(num_shards=n_shards, index=index, contiguous=True).with_format("numpy")
        ids = np.concatenate(list(shard["ids"])).astype(TOKEN_DTYPE)
        tokens[offset:offset + len(ids)] = ids
        offset += len(ids)
    tokens.flush()
    del tokens
    if offset != n_tokens:
        raise DataError(f"wrote {offset} tokens to {file} but expected {n_tokens}; delete it and prepare again")
    return n_tokens


def prepare(data_cfg, tokenizer, cache_dir: str | None = None, progress: bool = True) -> pathlib.Path:
    """Tokenize the documents of `data_cfg` (config.data) into train.bin/val.bin; return their directory.

    Returns at once when a finished directory with the same fingerprint exists.
    """
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
    tmp.mkdir()
    try:
        documents = load_splits(data_cfg)
        meta = {"fingerprint": expected, "tokenizer": tokenizer.name, "n_vocab": tokenizer.n_vocab,
                "eot_id": tokenizer.eot_id, "dtype": np.dtype(TOKEN_DTYPE).name, "format_version": FORMAT_VERSION,
                "tokens": {}, "documents": {}}
        with _datasets_progress(progress):
            for split in SPLITS:
                docs = documents[split]
                if len(docs) == 0:
                    raise DataError(f"the {split} split has no documents; check the data source and data.val_split")
                num_proc = data_cfg.num_proc if len(docs) >= SMALL_DATASET and data_cfg.num_proc > 1 else None
                encoded = docs.map(_EncodeDocuments(tokenizer), batched=True, num_proc=num_proc,
                                   remove_columns=docs.column_names, desc=f"tokenizing {split}")
                meta["tokens"][split] = _write_tokens(encoded, tmp / f"{split}.bin", split, progress)
                meta["documents"][split] = len(docs)
        # meta.json last: its presence is what marks a directory as finished.
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        try:
            os.replace(tmp, directory)
        except OSError:
            if not _is_done(directory, expected):  # another process finishing first is fine; anything else is not
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def main(argv: list[str] | None = None) -> pathlib.Path:
    """CLI: prepare the token files of a config file and print where they are."""
    from jaxllm.config import ConfigError, load_config

    argv = sys.argv[1:] if argv is None else argv
    config_path, overrides = None, []
    args = iter(argv)
    for arg in args:
        if arg == "--config":
            config_path = next(args, None)
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            overrides.append(arg[len("--config."):])
        else:
            raise SystemExit(f"unknown argument '{arg}'; usage: python -m jaxllm.data.prepare --config FILE "
                             f"[--config.data.FIELD=VALUE ...]")
    if not config_path:
        raise SystemExit("no config given; usage: python -m jaxllm.data.prepare --config configs/X.py")
    try:
        config = load_config(config_path, overrides)
        tok = tokenizer_lib.get_tokenizer(config.data.tokenizer, config.data.tokenizer_path)
        directory = prepare(config.data, tok, progress=config.train.progress)
    except (ConfigError, DataError, tokenizer_lib.TokenizerError) as error:
        raise SystemExit(f"error: {error}") from None
    meta = read_meta(directory)
    print(directory)
    for split in SPLITS:
        print(f"{split}: {meta['tokens'][split]:,} tokens in {meta['documents'][split]:,} documents")
    return directory


if __name__ == "__main__":
    main()
