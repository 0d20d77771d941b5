"""Documents: where the training and validation texts come from (Hub, local files, or the synthetic corpus).

`load_splits(data_cfg)` returns {"train": Dataset, "val": Dataset}, each with one string column "text".
`read_documents(data_cfg)` returns the same and the problems met reading local files, per file.
`source_fingerprint(data_cfg)` is everything that decides those documents, for prepare's cache key.

Local JSON lines are read line by line, so one bad line costs one row, not the file. Per file it counts
(and skips) "broken_line" (not JSON), "not_an_object", "missing_field" (no `data.text_field`) and
"not_text" (a number, list, ... instead of a string), and repairs, keeping the row, "invalid_utf8" (bytes
that are not UTF-8 become U+FFFD) and "invalid_unicode" (a lone surrogate, from a broken "\\ud83d" escape,
cannot be stored as UTF-8 and becomes "?"). Nulls and empty documents are left to prepare (encode.py), which counts them
for every source. A parquet file that cannot be opened (0 bytes, truncated, not parquet) is a DataError
that names it. JSON lines are held in memory; use parquet for local data larger than memory.

Validation documents follow the reference: with `data.val_split == ""` they are carved out of the train
split with `train_test_split(test_size=val_fraction, seed=split_seed, shuffle=True)` (datasets rounds the
test size up, so there is always at least one). `data.max_documents` keeps the first N documents of the
loaded train split *before* that carve-out, so a small run sees the same kind of split as a full one.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import pathlib

import datasets
import pyarrow.parquet as pq

from jaxllm.data import synthetic

TRUE_WORDS = ("1", "true", "yes", "on")
LOCAL_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
SKIPPED = ("broken_line", "not_an_object", "missing_field", "not_text")
REPAIRED = ("invalid_utf8", "invalid_unicode")
TEXT_FEATURES = datasets.Features({"text": datasets.Value("string")})


class DataError(ValueError):
    """Data cannot be loaded or prepared; the message says what is wrong and what to do."""


def _offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in TRUE_WORDS
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_unreachable(name: str) -> DataError:
    return DataError(f"cannot reach the Hugging Face Hub for dataset {name}; set --config.data.source=local "
                     f"--config.data.path=PATH to use local files (e.g. ../shared/data/textmix)")


def _looks_like_network_error(error: BaseException) -> bool:
    words = ("connection", "connect", "timeout", "timed out", "offline", "resolve", "network", "unreachable")
    while error is not None:
        if isinstance(error, (ConnectionError, TimeoutError)):
            return True
        text = f"{type(error).__name__} {error}".lower()
        if any(word in text for word in words):
            return True
        error = error.__cause__ or error.__context__
    return False


def _load_hub(name: str, split: str) -> datasets.Dataset:
    if _offline():
        raise _hub_unreachable(name)  # checked first: offline load_dataset can stall on retries
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as error:  # datasets raises many types; all become one clear sentence
        if _looks_like_network_error(error):
            raise _hub_unreachable(name) from error
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"cannot load split '{split}' of Hub dataset {name} ({first_line}); "
                        f"check --config.data.path and --config.data.val_split") from error


def _split_files(folder: pathlib.Path, split: str) -> list[pathlib.Path]:
    """Files of `split` in a folder: data/{split}-*.ext or {split}-*.ext, parquet before jsonl/json."""
    for ext in (".parquet", ".jsonl", ".json"):
        for pattern in (f"data/{split}-*{ext}", f"{split}-*{ext}", f"data/{split}{ext}", f"{split}{ext}"):
            files = sorted(folder.glob(pattern))
            if files:
                return files
    return []


def local_files(data_cfg) -> dict[str, list[pathlib.Path]]:
    """The local files behind each split: {"train": [...]} plus {val_split: [...]} when one is named.

    A file path is the train split. A folder uses `data/{split}-*.parquet`, `{split}-*.parquet` (or .jsonl,
    .json); when it has no train-named files, every *.parquet (else *.jsonl, *.json) in it is train.
    """
    path = pathlib.Path(data_cfg.path).expanduser().resolve()
    if not path.exists():
        raise DataError(f"the local data path {path} does not exist; set --config.data.path to a parquet/jsonl "
                        f"file or a folder such as ../shared/data/textmix")
    if path.is_file():
        if path.suffix not in LOCAL_FORMATS:
            raise DataError(f"the local data file {path} is not .parquet, .jsonl or .json; convert it or point "
                            f"--config.data.path at a folder of such files")
        if data_cfg.val_split:
            raise DataError(f"the local data path {path} is a single file, so it has no '{data_cfg.val_split}' "
                            f"split; set --config.data.val_split='' to carve validation out of it")
        return {"train": [path]}
    files = {"train": _split_files(path, "train")}
    if not files["train"]:
        named_val = set(_split_files(path, data_cfg.val_split)) if data_cfg.val_split else set()
        for ext in (".parquet", ".jsonl", ".json"):
            found = [f for f in sorted(path.glob(f"*{ext}")) + sorted(path.glob(f"data/*{ext}")) if f not in named_val]
            if found:
                files["train"] = found
                break
    if not files["train"]:
        raise DataError(f"the local data folder {path} has no train-*.parquet, *.parquet or *.jsonl files; "
                        f"set --config.data.path to a folder or file that holds the documents")
    if data_cfg.val_split:
        files[data_cfg.val_split] = _split_files(path, data_cfg.val_split)
        if not files[data_cfg.val_split]:
            raise DataError(f"the local data folder {path} has no '{data_cfg.val_split}' files "
                            f"(data/{data_cfg.val_split}-*.parquet); set --config.data.val_split to a split it has "
                            f"or to '' to carve validation out of train")
    return files


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _json_rows(file: pathlib.Path, problems: collections.Counter):
    """The rows of a .jsonl/.json file: one JSON value per line, or one JSON array for the whole file."""
    with open(file, "rb") as lines:
        head = lines.read(4096).lstrip()
        lines.seek(0)
        if head.startswith(b"["):
            try:
                yield from json.loads(lines.read().decode("utf-8", errors="replace"))
            except ValueError as error:
                raise DataError(f"the local data file {file} starts like a JSON array but cannot be parsed "
                                f"({_first_line(error)}); fix it or write it as JSON lines") from None
            return
        for raw in lines:
            if not raw.strip():
                continue  # blank lines (a trailing newline, say) are not rows
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("utf-8", errors="replace")
                problems["invalid_utf8"] += 1
            try:
                yield json.loads(line)
            except ValueError:
                problems["broken_line"] += 1


def _valid_unicode(text: str | None, problems: collections.Counter) -> str | None:
    """`text` with lone surrogates (which UTF-8 and Arrow cannot hold) replaced by "?", counted."""
    if text is None or text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        problems["invalid_unicode"] += 1
        return text.encode("utf-8", errors="replace").decode("utf-8")
    return text


def _read_json_texts(file: pathlib.Path, text_field: str) -> tuple[list, dict[str, int]]:
    """The `text_field` values of a JSON lines file (str or None), and the counts of the rows it skipped."""
    problems = collections.Counter()
    texts, columns = [], []
    for row in _json_rows(file, problems):
        if not isinstance(row, dict):
            problems["not_an_object"] += 1
        elif text_field not in row:
            problems["missing_field"] += 1
            columns = columns or list(row)
        elif row[text_field] is not None and not isinstance(row[text_field], str):
            problems["not_text"] += 1
        else:
            texts.append(_valid_unicode(row[text_field], problems))
    if not texts and problems["missing_field"]:
        raise DataError(f"the local data file {file} has no '{text_field}' field (found: {', '.join(columns)}); "
                        f"set --config.data.text_field to one of them")
    return texts, {kind: problems[kind] for kind in SKIPPED + REPAIRED if problems[kind]}


def _check_parquet(file: pathlib.Path) -> None:
    """Open the footer of a parquet file: a 0-byte, truncated or non-parquet file fails here, by name."""
    try:
        pq.ParquetFile(file).close()
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ...
        raise DataError(f"the local data file {file} cannot be read as parquet ({_first_line(error)}); "
                        f"re-download or remove it") from error


def _load_local(files: list[pathlib.Path], text_field: str, where: str) -> tuple[datasets.Dataset, dict]:
    """The "text" column of local files, and {file: {problem: count}} for the files that had bad rows."""
    kinds = {LOCAL_FORMATS[f.suffix] for f in files}
    if len(kinds) != 1:
        raise DataError(f"the local files {[str(f) for f in files]} mix formats; keep one of parquet or jsonl")
    if kinds.pop() == "json":
        texts, problems = [], {}
        for file in files:
            file_texts, file_problems = _read_json_texts(file, text_field)
            texts += file_texts
            if file_problems:
                problems[str(file)] = file_problems
        return datasets.Dataset.from_dict({"text": texts}, features=TEXT_FEATURES), problems
    for file in files:
        _check_parquet(file)
    try:
        dataset = datasets.load_dataset("parquet", data_files={"train": [str(f) for f in files]}, split="train")
    except Exception as error:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise DataError(f"the disk is full while datasets caches {files[0].parent}; free space or point "
                            f"HF_DATASETS_CACHE at a disk with room") from error
        raise DataError(f"cannot read local data files {files[0].parent} ({_first_line(error)}); "
                        f"check that they are valid parquet") from error
    return _text_only(dataset, text_field, where), {}


def _text_only(dataset: datasets.Dataset, text_field: str, where: str) -> datasets.Dataset:
    """Keep just `text_field`, renamed to "text"."""
    if text_field not in dataset.column_names:
        raise DataError(f"the {where} data has no '{text_field}' field (found: {', '.join(dataset.column_names)}); "
                        f"set --config.data.text_field to one of them")
    feature = dataset.features[text_field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"the {where} field '{text_field}' holds {feature}, not text; "
                        f"set --config.data.text_field to a string column")
    dataset = dataset.select_columns([text_field])
    return dataset.rename_column(text_field, "text") if text_field != "text" else dataset


def _load_synthetic(data_cfg) -> datasets.Dataset:
    records = synthetic.generate_problems(data_cfg.synthetic_documents, data_cfg.split_seed)
    return datasets.Dataset.from_dict({"text": [synthetic.format_document(r) for r in records]})


def load_splits(data_cfg) -> dict[str, datasets.Dataset]:
    """{"train", "val"} document datasets with one string column "text", from `data_cfg` (config.data)."""
    return read_documents(data_cfg)[0]


def read_documents(data_cfg) -> tuple[dict[str, datasets.Dataset], dict[str, dict[str, int]]]:
    """`load_splits(data_cfg)` and {file: {problem: count}} for the local files that had bad rows."""
    source, text_field = data_cfg.source, data_cfg.text_field
    val, problems = None, {}
    if source == "hub":
        train = _text_only(_load_hub(data_cfg.path, "train"), text_field, f"Hub {data_cfg.path} train")
        if data_cfg.val_split:
            val = _text_only(_load_hub(data_cfg.path, data_cfg.val_split), text_field,
                             f"Hub {data_cfg.path} {data_cfg.val_split}")
    elif source == "local":
        files = local_files(data_cfg)
        train, problems = _load_local(files["train"], text_field, f"local {data_cfg.path} train")
        if data_cfg.val_split:
            val, val_problems = _load_local(files[data_cfg.val_split], text_field,
                                            f"local {data_cfg.path} {data_cfg.val_split}")
            problems.update(val_problems)
    elif source == "synthetic":
        if data_cfg.synthetic_documents < 2:
            raise DataError(f"data.synthetic_documents is {data_cfg.synthetic_documents}; it must be at least 2 "
                            f"(one training and one validation document)")
        train = _load_synthetic(data_cfg)
    else:
        raise DataError(f"unknown data source '{source}'; set --config.data.source to synthetic, hub or local")

    if data_cfg.max_documents > 0:
        train = train.select(range(min(data_cfg.max_documents, len(train))))
    if val is None:
        if len(train) < 2:
            raise DataError(f"the {source} data has {len(train)} training document(s), too few to carve out "
                            f"validation; use more data or set --config.data.val_split")
        parts = train.train_test_split(test_size=data_cfg.val_fraction, seed=data_cfg.split_seed, shuffle=True)
        train, val = parts["train"], parts["test"]
    if len(val) == 0:
        raise DataError(f"the validation split '{data_cfg.val_split}' of {data_cfg.path} is empty; "
                        f"set --config.data.val_split='' to carve validation out of train")
    return {"train": train, "val": val}, problems


def source_fingerprint(data_cfg) -> dict:
    """A JSON-able dict of everything that decides the documents of `load_splits(data_cfg)`."""
    fingerprint = {
        "source": data_cfg.source,
        "text_field": data_cfg.text_field,
        "val_split": data_cfg.val_split,
        "val_fraction": data_cfg.val_fraction,
        "split_seed": data_cfg.split_seed,
        "max_documents": data_cfg.max_documents,
    }
    if data_cfg.source == "hub":
        fingerprint["path"] = data_cfg.path
    elif data_cfg.source == "local":
        fingerprint["path"] = str(pathlib.Path(data_cfg.path).expanduser().resolve())
        # Size and mtime stand in for content: hashing gigabytes on every start would be too slow.
        fingerprint["files"] = {split: [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
                                for split, files in local_files(data_cfg).items()}
    elif data_cfg.source == "synthetic":
        fingerprint["synthetic_documents"] = data_cfg.synthetic_documents
        fingerprint["synthetic_version"] = synthetic.VERSION
    return fingerprint
