"""Faults in the data pipeline: malformed rows and files, a full disk during prepare, forked workers, pickle.

Each test injects the fault for real (bad bytes on disk, a file size limit in a subprocess, JAX's threads
running while prepare starts its workers) and checks that the user gets counts or one clear sentence, and
that nothing half-written is ever taken for finished data.
"""

import json
import multiprocessing
import os
import pathlib
import pickle
import re
import subprocess
import sys
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxllm.config import default_config
from jaxllm.data import batches, prepare as prepare_lib
from jaxllm.data.sources import DataError
from jaxllm.tokenizer import get_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
BYTE = get_tokenizer("byte")


def data_config(**fields):
    cfg = default_config().data
    for key, value in fields.items():
        cfg[key] = value
    return cfg


def expected_tokens(texts):
    return np.concatenate([np.array(list(t.encode("utf-8")) + [BYTE.eot_id], dtype=np.uint16) for t in texts])


# ---------------------------------------------------------------- malformed rows and files

GOOD_TRAIN = [f"train document {i}: some words" for i in range(12)]
GOOD_VAL = [f"validation document {i}" for i in range(4)]


def write_bad_jsonl_folder(folder: pathlib.Path) -> None:
    """data/train-*.jsonl with one row of every kind of fault among good rows, data/validation-*.jsonl with a null."""
    (folder / "data").mkdir(parents=True)
    rows = [json.dumps({"text": t}).encode() for t in GOOD_TRAIN[:6]] + [
        json.dumps({"text": ""}).encode(),  # empty
        json.dumps({"text": " \n\t "}).encode(),  # whitespace only
        json.dumps({"text": None}).encode(),  # null
        json.dumps({"body": "no text field", "id": 3}).encode(),  # missing field
        json.dumps({"text": 42}).encode(),  # not text: a number
        json.dumps({"text": ["a", "list"]}).encode(),  # not text: a list
        json.dumps([1, 2, 3]).encode(),  # not an object
        b'{"text": "unclosed string, "id": 4}',  # broken JSON
        b'{"text": "caf\xe9 au lait"}',  # Latin-1, not UTF-8: repaired
        b'{"text": "half an emoji \\ud83d here"}',  # a lone surrogate escape: repaired
        b"",  # a blank line: not a row
    ] + [json.dumps({"text": t}).encode() for t in GOOD_TRAIN[6:]] + [
        b'{"text": "a file cut off in the midd',  # truncated last line, no newline
    ]
    (folder / "data" / "train-00000-of-00001.jsonl").write_bytes(b"\n".join(rows))
    val_rows = [json.dumps({"text": t}) for t in GOOD_VAL[:2]] + ['{"text": null}'] + [
        json.dumps({"text": t}) for t in GOOD_VAL[2:]]
    (folder / "data" / "validation-00000-of-00001.jsonl").write_text("\n".join(val_rows) + "\n")


def test_bad_jsonl_rows_are_skipped_counted_and_reported(tmp_path, capsys):
    write_bad_jsonl_folder(tmp_path / "docs")
    cfg = data_config(source="local", path=str(tmp_path / "docs"), val_split="validation")
    directory = prepare_lib.prepare(cfg, BYTE, cache_dir=str(tmp_path / "cache"), progress=False)

    meta = prepare_lib.read_meta(directory)
    train_file = str((tmp_path / "docs" / "data" / "train-00000-of-00001.jsonl").resolve())
    assert meta["problems"] == {
        "files": {train_file: {"broken_line": 2, "not_an_object": 1, "missing_field": 1, "not_text": 2,
                               "invalid_utf8": 1, "invalid_unicode": 1}},
        "train": {"null": 1, "empty": 2},
        "val": {"null": 1},
    }
    kept_train = GOOD_TRAIN[:6] + ["caf\ufffd au lait", "half an emoji ? here"] + GOOD_TRAIN[6:]
    np.testing.assert_array_equal(batches.open_tokens(directory / "train.bin"), expected_tokens(kept_train))
    np.testing.assert_array_equal(batches.open_tokens(directory / "val.bin"), expected_tokens(GOOD_VAL))
    assert meta["documents"] == {"train": 14, "val": 4}

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("prepare: skipped 10 bad rows (2 broken_line, 2 empty, 1 missing_field, 1 not_an_object, "
                             "2 not_text, 2 null) and repaired 2 (1 invalid_unicode, 1 invalid_utf8)")
    assert str(directory / "meta.json") in err[0]


def test_bad_parquet_rows_are_counted(tmp_path, capsys):
    texts = ["first document", None, "", "third document", "   ", "fourth document"]
    pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), tmp_path / "train.parquet")
    pq.write_table(pa.table({"text": pa.array(["val one", None, "val two"], type=pa.string())}),
                   tmp_path / "validation.parquet")
    cfg = data_config(source="local", path=str(tmp_path), val_split="validation")
    directory = prepare_lib.prepare(cfg, BYTE, cache_dir=str(tmp_path / "cache"), progress=False)
    meta = prepare_lib.read_meta(directory)
    assert meta["problems"] == {"files": {}, "train": {"null": 1, "empty": 2}, "val": {"null": 1}}
    np.testing.assert_array_equal(batches.open_tokens(directory / "train.bin"),
                                  expected_tokens(["first document", "third document", "fourth document"]))
    assert "skipped 4 bad rows (2 empty, 2 null)" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["empty", "truncated", "not_parquet"])
def test_unreadable_parquet_is_one_sentence_naming_the_file(tmp_path, damage):
    folder = tmp_path / "docs"
    (folder / "data").mkdir(parents=True)
    good = folder / "data" / "train-00000-of-00002.parquet"
    pq.write_table(pa.table({"text": [f"document {i} " * 20 for i in range(50)]}), good)
    bad = folder / "data" / "train-00001-of-00002.parquet"
    data = good.read_bytes()
    bad.write_bytes({"empty": b"", "truncated": data[:len(data) // 2], "not_parquet": b"<html>404</html>"}[damage])
    cfg = data_config(source="local", path=str(folder))
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as error:
        prepare_lib.prepare(cfg, BYTE, cache_dir=str(cache), progress=False)
    message = str(error.value)
    assert message.startswith(f"the local data file {bad.resolve()} cannot be read as parquet (")
    assert message.endswith("re-download or remove it") and "\n" not in message
    assert not [p for p in (cache / "prepared").iterdir()]  # no temp dir, nothing that looks finished


def test_a_split_of_only_bad_rows_is_one_sentence(tmp_path):
    file = tmp_path / "docs.jsonl"
    file.write_text('{"text": ""}\n{"text": null}\n{"text": "  "}\n{"text": null}\n')
    cfg = data_config(source="local", path=str(file), val_fraction=0.25)
    with pytest.raises(DataError, match=r"the (train|val) split has no usable documents \(.*\d+ (null|empty).*\); "
                                        r"check the data source"):
        prepare_lib.prepare(cfg, BYTE, cache_dir=str(tmp_path / "cache"), progress=False)


def test_prepare_cli_prints_the_problems_and_exits_2_on_errors(tmp_path, capsys):
    write_bad_jsonl_folder(tmp_path / "docs")
    config_file = tmp_path / "tiny.py"
    config_file.write_text("from jaxllm.config import default_config\n"
                           "def get_config():\n"
                           "    c = default_config()\n"
                           "    c.data.tokenizer = 'byte'\n"
                           "    return c\n")
    args = ["--config", str(config_file), "--config.data.source=local", f"--config.data.path={tmp_path / 'docs'}",
            "--config.data.val_split=validation", f"--config.data.cache_dir={tmp_path}", "--config.train.progress=false"]
    assert prepare_lib.main(args) == 0
    out = capsys.readouterr().out
    assert "train: " in out and "data problems: skipped 10 bad rows" in out
    assert prepare_lib.main(args[:-4] + [f"--config.data.path={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the local data path") and err.count("\n") == 1


# ---------------------------------------------------------------- a full disk

FULL_DISK_SCRIPT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from jaxllm.data import prepare
sys.exit(prepare.main(sys.argv[1:]))
"""


def test_full_disk_during_prepare_is_one_sentence_and_the_next_run_redoes_it(tmp_path):
    config_file = tmp_path / "tiny.py"
    config_file.write_text("from jaxllm.config import default_config\n"
                           "def get_config():\n"
                           "    c = default_config()\n"
                           "    c.data.tokenizer = 'byte'\n"
                           "    c.data.synthetic_documents = 300\n"
                           "    c.data.val_fraction = 0.1\n"
                           "    return c\n")
    cache = tmp_path / "cache"
    args = ["--config", str(config_file), f"--config.data.cache_dir={cache}", "--config.train.progress=false"]
    limit = 48 * 1024  # train.bin of 300 documents is ~150 KB: the disk "fills" part-way through it
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT.format(limit=limit), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: the disk is full (or a file size limit was hit) while writing the "
                                    f"prepared tokens under {cache / 'prepared'} (File too large); nothing was kept")
    assert result.stderr.count("\n") == 1, result.stderr  # one sentence, no traceback
    assert list((cache / "prepared").iterdir()) == []  # no temp dir and nothing that looks finished

    # With room, the next run prepares everything, identical to a run that never saw a full disk.
    cfg = data_config(tokenizer="byte", synthetic_documents=300, val_fraction=0.1)
    directory = prepare_lib.prepare(cfg, BYTE, cache_dir=str(cache), progress=False)
    clean = prepare_lib.prepare(cfg, BYTE, cache_dir=str(tmp_path / "clean"), progress=False)
    assert (directory / "train.bin").stat().st_size > limit
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (directory / name).read_bytes() == (clean / name).read_bytes()


# ---------------------------------------------------------------- tokenizer workers are never forked from JAX


def test_prepare_workers_never_fork_the_jax_process(tmp_path, monkeypatch):
    import jax

    jax.devices()  # a live backend: JAX's threads run and its at-fork warning is armed
    contexts = []
    get_context = multiprocessing.get_context
    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: contexts.append(method) or
                        get_context(method))
    cfg = data_config(source="synthetic", synthetic_documents=1100, val_fraction=0.01, num_proc=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        directory = prepare_lib.prepare(cfg, BYTE, cache_dir=str(tmp_path / "workers"), progress=False)
    forks = [str(w.message) for w in caught if "fork" in str(w.message)]
    assert forks == []
    assert contexts == ["forkserver"]  # the two workers did run, from the fork server
    single = prepare_lib.prepare(data_config(source="synthetic", synthetic_documents=1100, val_fraction=0.01,
                                             num_proc=1), BYTE, cache_dir=str(tmp_path / "single"), progress=False)
    for name in ("train.bin", "val.bin"):
        assert (directory / name).read_bytes() == (single / name).read_bytes()


# ---------------------------------------------------------------- no pickle


PICKLE_PATTERNS = [r"\bimport pickle\b", r"\bimport dill\b", r"\bcloudpickle\b", r"\bjoblib\b", r"\bshelve\b",
                   r"allow_pickle\s*=\s*True", r"pickle\.load", r"\bUnpickler\b", r"torch\.load\("]


def test_no_pickle_in_the_package():
    """No module of jaxllm/ or scripts/ imports pickle (or a relative), and every np.load forbids pickle."""
    found = []
    for path in sorted([*(REPO / "jaxllm").rglob("*.py"), *(REPO / "scripts").rglob("*.py")]):
        text = path.read_text()
        found += [f"{path.relative_to(REPO)}: {p}" for p in PICKLE_PATTERNS if re.search(p, text)]
        found += [f"{path.relative_to(REPO)}: {call}" for call in re.findall(r"np\.load\([^)]*\)", text)
                  if "allow_pickle=False" not in call]
    assert found == []


@pytest.mark.slow  # ~1 min here: three compiles of a tiny model; run with -m slow
def test_train_resume_and_eval_never_unpickle(tmp_path, monkeypatch, interrupt_train_step):
    """A tiny train, a resume from its checkpoint and a MathQA eval with every unpickling entry point raising."""
    from jaxllm import eval as eval_lib
    from jaxllm import train as train_lib

    config = default_config()
    config.model.n_layer, config.model.n_embd, config.model.n_head = 2, 64, 4
    config.model.vocab_size, config.model.sequence_length = 320, 32
    config.data.tokenizer, config.data.synthetic_documents, config.data.num_proc = "byte", 300, 1
    config.data.cache_dir = str(tmp_path / "cache")
    config.mathqa.synthetic_problems = 40
    config.train.steps, config.train.batch_size, config.train.grad_accum = 6, 8, 1
    config.train.eval_every, config.train.eval_batches, config.train.checkpoint_every = 3, 2, 3
    config.train.num_devices, config.train.progress = 1, False

    def unpickling(*args, **kwargs):
        raise AssertionError("something unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, unpickling)
    try:
        import dill
        for name in ("load", "loads", "Unpickler"):
            monkeypatch.setattr(dill, name, unpickling)
    except ImportError:
        pass

    def interrupt():
        raise KeyboardInterrupt

    with interrupt_train_step(5, interrupt), pytest.raises(KeyboardInterrupt):
        train_lib.train(config, tmp_path / "run")
    assert train_lib.checkpoint_lib.Checkpointer(tmp_path / "run" / "checkpoints").latest_step() == 3
    assert train_lib.train(config, tmp_path / "run")["step"] == 6  # resumed from the step-3 checkpoint
    assert eval_lib.main(["--workdir", str(tmp_path / "run"), "--shots", "1", "--max_questions", "4"]) == 0
