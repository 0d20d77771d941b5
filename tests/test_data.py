"""The data pipeline: synthetic corpus, document sources, token preparation and batch order."""

import ast
import json
import os
import pathlib
import re
import time
from fractions import Fraction

import numpy as np
import pytest

from jaxllm.config import default_config
from jaxllm.data import batches, prepare as prepare_lib, sources, synthetic
from jaxllm.data.sources import DataError, load_splits, source_fingerprint
from jaxllm.tokenizer import get_tokenizer

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
TEXTMIX = SHARED / "data" / "textmix"
MATHQA_FIELDS = {"Problem", "Rationale", "options", "correct", "annotated_formula", "linear_formula", "category"}


def data_config(**fields):
    cfg = default_config().data
    for key, value in fields.items():
        cfg[key] = value
    return cfg


def parse_options(text: str) -> list[tuple[str, str]]:
    """The MathQA options parser documented in shared/data/mathqa/README.md."""
    items = ast.literal_eval(text) if text.startswith("[") else re.split(r"\s*,\s*(?=[b-e]\s*\)\s)", text)
    return [re.match(r"\s*([a-e])\s*\)\s*(.*)$", item).groups() for item in items]


def evaluate_formula(formula: str) -> Fraction:
    """Exact value of an annotated_formula built from the operations the synthetic templates use."""
    ops = {"add": lambda a, b: a + b, "subtract": lambda a, b: a - b, "multiply": lambda a, b: a * b,
           "divide": lambda a, b: a / b, "rectangle_area": lambda a, b: a * b,
           "rectangle_perimeter": lambda a, b: 2 * (a + b), "square_area": lambda a: a * a}
    formula = re.sub(r"const_(\d+)_(\d+)", r"Fraction('\1.\2')", formula)
    formula = re.sub(r"const_(\d+)", r"Fraction(\1)", formula)
    formula = re.sub(r"(?<![\w.'])(\d+)(?![\w.'])", r"Fraction(\1)", formula)
    return eval(formula, {"__builtins__": {}, "Fraction": Fraction, **ops})


def option_value(text: str) -> Fraction:
    return Fraction(text.replace(" ", ""))


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_prefix_stable():
    first = synthetic.generate_problems(60, seed=7)
    assert first == synthetic.generate_problems(60, seed=7)
    assert first[:20] == synthetic.generate_problems(20, seed=7)
    assert first != synthetic.generate_problems(60, seed=8)


def test_synthetic_records_are_mathqa_shaped_and_correct():
    records = synthetic.generate_problems(600, seed=0)
    letters, categories, formulas = set(), set(), set()
    for record in records:
        assert set(record) == MATHQA_FIELDS and all(isinstance(v, str) for v in record.values())
        assert record["Problem"] == record["Problem"].lower()
        assert " ." in record["Problem"] or " ?" in record["Problem"]  # space-tokenized punctuation
        options = parse_options(record["options"])
        assert [letter for letter, _ in options] == list("abcde")
        values = [value for _, value in options]
        assert len(set(values)) == 5, record["options"]
        assert record["correct"] in "abcde"
        answer = dict(options)[record["correct"]]
        assert option_value(answer) == evaluate_formula(record["annotated_formula"]), record
        assert record["Rationale"].endswith(f"answer : {record['correct']}")
        assert record["linear_formula"].endswith("|")
        assert record["category"] in synthetic.CATEGORIES
        letters.add(record["correct"])
        categories.add(record["category"])
        formulas.add(record["linear_formula"].split("(")[0] + record["Problem"][:12])
    assert letters == set("abcde")  # the right answer's position is randomized
    assert len(categories) >= 5
    assert len(formulas) >= 8  # many templates, not one


def test_format_document():
    record = synthetic.generate_problems(1, seed=3)[0]
    lines = synthetic.format_document(record).split("\n")
    assert lines == [f"Problem: {record['Problem']}", f"Options: {record['options']}",
                     f"Rationale: {record['Rationale']}", f"Answer: {record['correct']}"]


# ---------------------------------------------------------------- sources


def test_synthetic_source_splits():
    splits = load_splits(data_config(source="synthetic", synthetic_documents=50, val_fraction=0.1))
    assert (len(splits["train"]), len(splits["val"])) == (45, 5)
    assert splits["train"].column_names == ["text"] and splits["val"].column_names == ["text"]
    assert splits["val"][0]["text"].startswith("Problem: ")


def test_tiny_split_still_has_one_val_document():
    splits = load_splits(data_config(source="synthetic", synthetic_documents=10))  # 10 * 0.0005 rounds up
    assert (len(splits["train"]), len(splits["val"])) == (9, 1)


@pytest.mark.skipif(not TEXTMIX.is_dir(), reason="shared/data/textmix is not present")
def test_local_textmix_folder():
    carved = load_splits(data_config(source="local", path=str(TEXTMIX), max_documents=40, val_fraction=0.05))
    assert (len(carved["train"]), len(carved["val"])) == (38, 2)
    assert carved["train"].column_names == ["text"]
    named = load_splits(data_config(source="local", path=str(TEXTMIX), max_documents=10, val_split="validation"))
    assert (len(named["train"]), len(named["val"])) == (10, 251)
    assert named["val"].column_names == ["text"] and isinstance(named["val"][0]["text"], str)


def test_local_jsonl_with_custom_field(tmp_path):
    file = tmp_path / "docs.jsonl"
    file.write_text("".join(json.dumps({"body": f"document {i}", "id": i}) + "\n" for i in range(30)))
    splits = load_splits(data_config(source="local", path=str(file), text_field="body", val_fraction=0.1))
    assert (len(splits["train"]), len(splits["val"])) == (27, 3)
    assert splits["train"].column_names == ["text"]
    texts = sorted(list(splits["train"]["text"]) + list(splits["val"]["text"]))
    assert texts == sorted(f"document {i}" for i in range(30))


def test_local_missing_text_field_names_columns(tmp_path):
    file = tmp_path / "docs.jsonl"
    file.write_text('{"body": "x", "id": 1}\n{"body": "y", "id": 2}\n')
    with pytest.raises(DataError, match="body"):
        load_splits(data_config(source="local", path=str(file)))


def test_local_folder_split_naming(tmp_path):
    (tmp_path / "data").mkdir()
    for split, n in (("train", 8), ("validation", 3)):
        (tmp_path / "data" / f"{split}-00000-of-00001.jsonl").write_text(
            "".join(json.dumps({"text": f"{split} {i}"}) + "\n" for i in range(n)))
    splits = load_splits(data_config(source="local", path=str(tmp_path), val_split="validation"))
    assert sorted(splits["val"]["text"]) == [f"validation {i}" for i in range(3)]
    with pytest.raises(DataError, match="'test'"):
        load_splits(data_config(source="local", path=str(tmp_path), val_split="test"))


def test_missing_local_path_names_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        load_splits(data_config(source="local", path=str(missing)))


def test_hub_offline_fails_fast_with_suggestion():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest
    start = time.perf_counter()
    with pytest.raises(DataError, match="source=local") as error:
        load_splits(data_config(source="hub", path="DKYoon/SlimPajama-6B"))
    assert time.perf_counter() - start < 2.0
    assert "DKYoon/SlimPajama-6B" in str(error.value)


def test_hub_connection_error_becomes_data_error(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'DKYoon/SlimPajama-6B' on the Hub")

    monkeypatch.setattr(sources.datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match="cannot reach the Hugging Face Hub.*source=local"):
        load_splits(data_config(source="hub", path="DKYoon/SlimPajama-6B"))

    def missing(*args, **kwargs):
        raise FileNotFoundError("Dataset 'nobody/nothing' doesn't exist on the Hub")

    monkeypatch.setattr(sources.datasets, "load_dataset", missing)
    with pytest.raises(DataError, match="nobody/nothing.*data.path"):
        load_splits(data_config(source="hub", path="nobody/nothing"))


def test_fingerprint_tracks_local_file_changes(tmp_path):
    file = tmp_path / "docs.jsonl"
    file.write_text('{"text": "a"}\n{"text": "b"}\n')
    cfg = data_config(source="local", path=str(file))
    before = source_fingerprint(cfg)
    assert before["path"] == str(file.resolve())
    file.write_text('{"text": "a"}\n{"text": "bc"}\n')
    assert source_fingerprint(cfg) != before


# ---------------------------------------------------------------- prepare


@pytest.fixture
def byte_tok():
    return get_tokenizer("byte")


def small_synthetic(**fields):
    return data_config(**{"source": "synthetic", "synthetic_documents": 40, "val_fraction": 0.1, **fields})


def test_prepare_writes_uint16_with_eot_after_every_document(tmp_path, byte_tok):
    cfg = small_synthetic()
    directory = prepare_lib.prepare(cfg, byte_tok, cache_dir=str(tmp_path), progress=False)
    assert directory.parent == tmp_path / "prepared" and len(directory.name) == 16
    meta = json.loads((directory / "meta.json").read_text())
    docs = load_splits(cfg)
    for split in ("train", "val"):
        texts = list(docs[split]["text"])
        expected = np.concatenate([np.array(byte_tok.encode(t) + [byte_tok.eot_id]) for t in texts])
        tokens = batches.open_tokens(directory / f"{split}.bin")
        assert tokens.dtype == np.uint16
        assert len(tokens) == sum(len(byte_tok.encode(t)) + 1 for t in texts) == meta["tokens"][split]
        np.testing.assert_array_equal(tokens, expected)
        assert int((tokens == byte_tok.eot_id).sum()) == len(texts) == meta["documents"][split]
        assert tokens[-1] == byte_tok.eot_id
    assert (meta["tokenizer"], meta["n_vocab"], meta["eot_id"]) == ("byte", 257, 256)


def test_prepare_is_idempotent(tmp_path, byte_tok, monkeypatch):
    cfg = small_synthetic()
    directory = prepare_lib.prepare(cfg, byte_tok, cache_dir=str(tmp_path), progress=False)
    mtime = (directory / "train.bin").stat().st_mtime_ns

    def must_not_load(_):
        raise AssertionError("prepare re-read the documents of a finished directory")

    monkeypatch.setattr(prepare_lib, "read_documents", must_not_load)
    assert prepare_lib.prepare(cfg, byte_tok, cache_dir=str(tmp_path), progress=False) == directory
    assert (directory / "train.bin").stat().st_mtime_ns == mtime
    other = small_synthetic(synthetic_documents=41)
    assert prepare_lib.prepared_dir(other, byte_tok, str(tmp_path)) != directory


def test_prepare_survives_a_kill(tmp_path, byte_tok, monkeypatch):
    cfg = small_synthetic()
    directory = prepare_lib.prepared_dir(cfg, byte_tok, str(tmp_path))

    # A run killed while writing: nothing may look finished, and no temp dir stays behind.
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_lib, "_write_tokens", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_lib.prepare(cfg, byte_tok, cache_dir=str(tmp_path), progress=False)
    monkeypatch.undo()
    assert not directory.exists() and not list(directory.parent.glob("*.tmp-*"))

    # Leftovers of a hard kill (SIGKILL skips cleanup): a dead process's temp dir and a dir without meta.json.
    stale_tmp = directory.with_name(f"{directory.name}.tmp-999999999")
    stale_tmp.mkdir(parents=True)
    (stale_tmp / "train.bin").write_bytes(b"\0" * 10)
    directory.mkdir()
    (directory / "train.bin").write_bytes(b"\0" * 10)
    assert prepare_lib.read_meta(directory) is None
    assert prepare_lib.prepare(cfg, byte_tok, cache_dir=str(tmp_path), progress=False) == directory
    assert prepare_lib.read_meta(directory)["tokens"]["train"] > 5
    assert not stale_tmp.exists()


def test_prepare_multiprocess_tokenization(tmp_path, byte_tok):
    # >= 1000 documents uses data.num_proc workers: the tokenizer must pickle and order must be kept.
    cfg = data_config(source="synthetic", synthetic_documents=1100, val_fraction=0.01, num_proc=2)
    directory = prepare_lib.prepare(cfg, byte_tok, cache_dir=str(tmp_path), progress=False)
    texts = list(load_splits(cfg)["train"]["text"])
    tokens = batches.open_tokens(directory / "train.bin")
    assert len(tokens) == sum(len(t.encode()) + 1 for t in texts)
    assert byte_tok.decode(tokens[:len(texts[0].encode())]) == texts[0]


def test_prepare_rejects_vocab_over_uint16(tmp_path):
    class Huge:
        name, n_vocab, eot_id = "huge", 70000, 0

    with pytest.raises(DataError, match="65536"):
        prepare_lib.prepare(small_synthetic(), Huge(), cache_dir=str(tmp_path), progress=False)


def test_prepare_cli(tmp_path, capsys):
    config_file = tmp_path / "tiny.py"
    config_file.write_text(
        "from jaxllm.config import default_config\n"
        "def get_config():\n"
        "    c = default_config()\n"
        "    c.data.tokenizer = 'byte'\n"
        "    return c\n")
    assert prepare_lib.main(["--config", str(config_file), "--config.data.synthetic_documents=30",
                             f"--config.data.cache_dir={tmp_path}", "--config.train.progress=false"]) == 0
    out = capsys.readouterr().out
    assert str(next((tmp_path / "prepared").iterdir())) in out and "train:" in out and "val:" in out


# ---------------------------------------------------------------- batches


@pytest.fixture
def ramp_tokens(tmp_path):
    """A token file whose value is its own position: windows and shifts can be read off the ids."""
    n_tokens = 16 * 25 + 5  # 25 windows of 16, plus a partial tail
    path = tmp_path / "ramp.bin"
    np.arange(n_tokens, dtype=np.uint16).tofile(path)
    return batches.open_tokens(path)


def window_ids(batch, seq_len):
    starts = batch["inputs"][:, 0]
    assert np.all(starts % seq_len == 0)
    return list(starts // seq_len)


def test_num_windows():
    assert batches.num_windows(16 * 25 + 5, 16) == 25
    assert batches.num_windows(16 * 25 + 1, 16) == 25
    assert batches.num_windows(16 * 25, 16) == 24  # the last window's final target is missing


def test_train_batch_shapes_and_shift(ramp_tokens):
    batch = batches.train_batch(ramp_tokens, seed=1, step=0, batch_size=4, seq_len=16)
    assert batch["inputs"].shape == batch["targets"].shape == batch["weights"].shape == (4, 16)
    assert (batch["inputs"].dtype, batch["targets"].dtype, batch["weights"].dtype) == (np.int32, np.int32, np.float32)
    np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)  # the ramp: target = next position
    for row, window in zip(batch["inputs"], window_ids(batch, 16)):
        np.testing.assert_array_equal(row, ramp_tokens[window * 16:window * 16 + 16])
    assert np.all(batch["weights"] == 1)


def test_train_order_is_a_pure_function_of_seed_and_step(ramp_tokens):
    first = batches.train_batch(ramp_tokens, seed=3, step=2, batch_size=4, seq_len=16)
    batches.window_permutation.cache_clear()  # a "resumed" process has no cached state
    again = batches.train_batch(ramp_tokens, seed=3, step=2, batch_size=4, seq_len=16)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    other_seed = batches.train_batch(ramp_tokens, seed=4, step=2, batch_size=4, seq_len=16)
    assert not np.array_equal(first["inputs"], other_seed["inputs"])


def test_train_windows_without_replacement_per_epoch(ramp_tokens):
    # 25 windows, batch 4: steps 0..5 are in epoch 0, step 6 straddles epochs 0 and 1.
    seen = [w for step in range(6) for w in window_ids(
        batches.train_batch(ramp_tokens, seed=0, step=step, batch_size=4, seq_len=16), 16)]
    assert len(seen) == len(set(seen)) == 24
    straddle = window_ids(batches.train_batch(ramp_tokens, seed=0, step=6, batch_size=4, seq_len=16), 16)
    assert sorted(seen + straddle[:1]) == list(range(25))  # epoch 0 is complete
    epoch1 = straddle[1:] + [w for step in range(7, 12) for w in window_ids(
        batches.train_batch(ramp_tokens, seed=0, step=step, batch_size=4, seq_len=16), 16)]
    assert len(set(epoch1)) == len(epoch1)
    order0 = [int(w) for w in batches.train_windows(25, seed=0, step=0, batch_size=25)]
    order1 = [int(w) for w in batches.train_windows(25, seed=0, step=1, batch_size=25)]
    assert sorted(order0) == sorted(order1) == list(range(25)) and order0 != order1  # reshuffled per epoch


def test_eval_batches_are_fixed_and_spread(ramp_tokens):
    first = batches.eval_batches(ramp_tokens, n_batches=2, batch_size=4, seq_len=16)
    second = batches.eval_batches(ramp_tokens, n_batches=2, batch_size=4, seq_len=16)
    assert len(first) == 2
    for a, b in zip(first, second):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    windows = [w for batch in first for w in window_ids(batch, 16)]
    assert len(set(windows)) == 8 and windows[0] == 0 and windows[-1] >= 20  # spread over all 25
    assert all(np.all(batch["weights"] == 1) for batch in first)


def test_eval_batches_pad_when_windows_run_out(ramp_tokens):
    result = batches.eval_batches(ramp_tokens, n_batches=10, batch_size=4, seq_len=16)
    assert len(result) == 7  # 25 windows -> 6 full batches + 1 window padded to 4 rows
    last = result[-1]
    assert last["inputs"].shape == (4, 16)
    assert np.all(last["weights"][0] == 1) and np.all(last["weights"][1:] == 0)
    assert np.all(last["inputs"][1:] == 0) and np.all(last["targets"][1:] == 0)


def test_all_eval_batches_cover_every_window_once(ramp_tokens):
    seen = []
    for batch in batches.all_eval_batches(ramp_tokens, batch_size=4, seq_len=16):
        assert batch["inputs"].shape == batch["targets"].shape == batch["weights"].shape == (4, 16)
        real = batch["weights"][:, 0] == 1
        seen += [int(s) // 16 for s in batch["inputs"][real, 0]]
        np.testing.assert_array_equal(batch["targets"][real], batch["inputs"][real] + 1)
    assert seen == list(range(25))


def test_too_short_split_is_an_error(tmp_path):
    path = tmp_path / "short.bin"
    np.arange(16, dtype=np.uint16).tofile(path)
    tokens = batches.open_tokens(path)
    with pytest.raises(DataError, match="train split has 16 tokens, fewer than sequence_length \\+ 1 = 17"):
        batches.train_batch(tokens, seed=0, step=0, batch_size=2, seq_len=16)
    with pytest.raises(DataError, match="val split"):
        batches.all_eval_batches(tokens, batch_size=2, seq_len=16)
    with pytest.raises(DataError, match="val split"):
        batches.eval_batches(tokens, n_batches=1, batch_size=2, seq_len=16)


def test_open_tokens_missing_file(tmp_path):
    with pytest.raises(DataError, match="prepare"):
        batches.open_tokens(tmp_path / "train.bin")
