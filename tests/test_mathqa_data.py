"""MathQA parsing, formatting, the loss mask and padded batches."""

import csv
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from jaxllm import config as config_lib, loss as loss_lib, models
from jaxllm.data import mathqa, sources, synthetic
from jaxllm.data.sources import DataError
from jaxllm.tokenizer import ByteTokenizer


def shared_dir():
    """../shared found by walking up from this file (worktrees sit at different depths), or $JAXLLM_SHARED."""
    if os.environ.get("JAXLLM_SHARED"):
        return pathlib.Path(os.environ["JAXLLM_SHARED"])
    for parent in pathlib.Path(__file__).resolve().parents:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared"
    return None


SHARED = shared_dir()
MATHQA_DIR = SHARED / "data" / "mathqa" if SHARED else None
needs_shared = pytest.mark.skipif(MATHQA_DIR is None or not MATHQA_DIR.is_dir(), reason="../shared/data/mathqa absent")

RECORD = {"Problem": "what is 2 + 3 ?", "Rationale": '"2 + 3 = 5 answer : b"',
          "options": "a ) 4 , b ) 5 , c ) rs . 27,000 , d ) 7 , e ) none of these", "correct": "b",
          "annotated_formula": "add(n0,n1)", "linear_formula": "add(n0,n1)|", "category": "general"}


def test_parse_options_string_form_keeps_commas_inside_values():
    assert mathqa.parse_options(RECORD["options"]) == ("4", "5", "rs . 27,000", "7", "none of these")


def test_parse_options_python_list_form():
    text = "['a ) 4', 'b ) 4 π', 'c ) 16', 'd ) 8 π', 'e ) 16']"
    assert mathqa.parse_options(text) == ("4", "4 π", "16", "8 π", "16")


@pytest.mark.parametrize("text, reason", [
    ("", "empty options"),
    ("a ) 1 , b ) 2 , c ) 3 , d ) 4", "not five options a-e"),
    ("['a ) 1', 'b ) 2'", "unreadable option list"),
    ("a ) 1 , b ) 2 , b ) 3 , d ) 4 , e ) 5", "repeated option letter"),
    ("['x 1', 'b ) 2']", "option without a letter"),
])
def test_bad_options_raise_with_their_reason(text, reason):
    with pytest.raises(mathqa.OptionsError) as info:
        mathqa.parse_options(text)
    assert info.value.reason == reason


def test_unreadable_rows_are_counted_by_reason_not_dropped_silently():
    rows = [RECORD, {**RECORD, "options": "a ) 1 , b ) 2"}, {**RECORD, "correct": "f"}, {**RECORD, "options": None}]
    questions, report = mathqa.parse_records(rows)
    assert len(questions) == 1 and questions[0].answer == 1 and questions[0].rationale == "2 + 3 = 5 answer : b"
    assert report.summary() == {"rows": 4, "read": 1, "skipped": {"not five options a-e": 1, "answer not a-e": 1,
                                                                  "missing options": 1}}


def test_local_json_jsonl_parquet_and_category_csv_give_the_same_questions(tmp_path):
    records = [RECORD, {**RECORD, "options": "['a ) 1', 'b ) 2', 'c ) 3', 'd ) 4', 'e ) 5']", "correct": "e"}]
    (tmp_path / "a.json").write_text(json.dumps(records, indent=4))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    import pyarrow as pa, pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "a.parquet")
    with open(tmp_path / "a.csv", "w", newline="") as file:  # the shared CSVs' lossy layout
        writer = csv.writer(file)
        writer.writerow(["", "Problem", "correct", "category"] + [f"option_{x}" for x in "abcde"])
        writer.writerow([0, RECORD["Problem"], "b", "general", " 4 ", " 5 ", " rs . 27,000 ", " 7 ", " none of these "])
        writer.writerow([1, RECORD["Problem"], "e", "general", " 1'", " 2'", " 3'", " 4'", " 5'] "])
    parsed = {ext: mathqa.parse_records(mathqa.read_file(tmp_path / f"a.{ext}"))[0]
              for ext in ("json", "jsonl", "parquet", "csv")}
    for ext in ("jsonl", "parquet"):
        assert parsed[ext] == parsed["json"]
    assert [q.options for q in parsed["csv"]] == [q.options for q in parsed["json"]]
    assert [q.answer for q in parsed["csv"]] == [1, 4]


def test_local_split_names_map_to_the_original_files(tmp_path):
    (tmp_path / "dev.json").write_text(json.dumps([RECORD]))
    assert mathqa.local_split_files(str(tmp_path), "validation") == [tmp_path / "dev.json"]
    with pytest.raises(DataError, match="no MathQA 'test' files"):
        mathqa.local_split_files(str(tmp_path), "test")


def test_hub_fails_fast_offline():
    c = config_lib.default_config()
    c.mathqa.source = "hub"
    with pytest.raises(DataError, match="cannot reach the Hugging Face Hub"):
        mathqa.load_questions(c.mathqa, "train")


@needs_shared
def test_every_row_of_the_shared_files_reads_as_five_options():
    counts = {}
    for name in ("dev", "test", "challenge_test"):
        questions, report = mathqa.parse_records(mathqa.read_file(MATHQA_DIR / f"{name}.json"))
        assert report.skipped == {} and all(len(q.options) == 5 for q in questions)
        counts[name] = len(questions)
    assert counts == {"dev": 4475, "test": 2985, "challenge_test": 604}
    files = mathqa.local_split_files(str(MATHQA_DIR), "train")
    questions, report = mathqa.parse_records(r for f in files for r in mathqa.read_file(f))
    assert report.rows == report.read == 29837


def test_synthetic_questions_use_the_same_schema():
    c = config_lib.default_config()
    c.mathqa.synthetic_problems = 50
    splits, reports = mathqa.load_splits(c.mathqa)
    assert len(splits["train"]) == 50 and len(splits["val"]) == 5 and len(splits["test"]) == 5
    assert reports["train"]["skipped"] == {}
    assert splits["train"][0] != splits["test"][0]  # different seeds per split


def test_tiny_demo_test_problems_are_in_no_training_text():
    """configs/tiny.py as shipped: no synthetic test problem is in the pretraining corpus (train or
    validation documents) or in the fine-tune train/validation splits (it was 137 and 70 of 200)."""
    c = config_lib.load_config(str(pathlib.Path(__file__).parents[1] / "configs" / "tiny.py"))
    documents = sources.load_splits(c.data)
    corpus = "\n".join(list(documents["train"]["text"]) + list(documents["val"]["text"])) + "\n"
    splits, _ = mathqa.load_splits(c.mathqa)
    test = [q.problem for q in splits["test"]]
    assert len(test) == 200 and len(documents["train"]) + len(documents["val"]) == 20000
    assert [p for p in test if f"Problem: {p}\n" in corpus] == []
    assert set(test).isdisjoint(q.problem for q in splits["train"] + splits["val"])


@pytest.mark.parametrize("seed", [0, 3, 2357])
def test_synthetic_training_and_held_out_problems_never_meet(seed):
    """Any seeds and sizes: training draws never use a held-out problem text and evaluation draws only
    those, so the two sides are disjoint by construction (and each side keeps every template)."""
    train = synthetic.generate_problems(400, seed)
    held = synthetic.generate_problems(400, seed + 1, held_out=True)
    assert not any(synthetic.is_held_out(r["Problem"]) for r in train)
    assert all(synthetic.is_held_out(r["Problem"]) for r in held)
    assert {r["category"] for r in held} == set(synthetic.CATEGORIES)
    assert held[:50] == synthetic.generate_problems(50, seed + 1, held_out=True)  # a prefix, as training's
    assert train[:100] == synthetic.generate_problems(100, seed)
    c = config_lib.default_config()
    c.mathqa.synthetic_problems = 300
    for split in ("test", "challenge_test"):
        assert all(synthetic.is_held_out(q.problem) for q in mathqa.load_questions(c.mathqa, split)[0])


def test_prompt_template():
    q = mathqa.parse_record(RECORD)
    assert mathqa.format_prompt(q) == ("Question: what is 2 + 3 ?\n"
                                       "Options: a ) 4 , b ) 5 , c ) rs . 27,000 , d ) 7 , e ) none of these\nAnswer:")
    assert mathqa.format_target(q) == " b ) 5"
    assert mathqa.format_target(q, rationale=True) == " b ) 5\nRationale: 2 + 3 = 5 answer : b"


def test_loss_mask_covers_exactly_the_answer_and_the_eot():
    tok = ByteTokenizer()
    q = mathqa.parse_record(RECORD)
    prompt, target = mathqa.format_prompt(q), mathqa.format_target(q)
    ids, mask = mathqa.tokenize_example(tok, prompt, target, max_length=512)
    assert len(ids) == len(prompt) + len(target) + 1
    assert ids[-1] == tok.eot_id
    assert tok.decode(ids[mask == 1]) == target and mask[-1] == 1
    assert tok.decode(ids[mask == 0]) == prompt
    batch = mathqa.make_batch([(ids, mask)], batch_size=2, seq_len=320)
    # weights follow the *targets*: exactly the answer bytes and the closing EOT carry loss
    assert tok.decode(batch["targets"][0][batch["weights"][0] == 1]) == target
    assert batch["targets"][0][batch["weights"][0] == 1][-1] == tok.eot_id
    assert batch["weights"].sum() == len(target) + 1  # no prompt, no padding, no padding row


def test_long_prompts_are_cut_from_the_left_keeping_the_answer():
    tok = ByteTokenizer()
    ids, mask = mathqa.tokenize_example(tok, "x" * 100, " b ) 5", max_length=20)
    assert len(ids) == 21 and mask.sum() == 7 and tok.decode(ids[mask == 1]) == " b ) 5"


def test_batch_length_is_the_longest_example_rounded_up():
    assert mathqa.padded_length([10, 70], pad_multiple=64, max_length=256) == 128
    assert mathqa.padded_length([10, 700], pad_multiple=64, max_length=256) == 256
    assert mathqa.padded_length([10], pad_multiple=0, max_length=256) == 256


@pytest.mark.slow
def test_padding_changes_no_loss():
    c = config_lib.default_config()
    c.model.n_layer, c.model.n_embd, c.model.n_head, c.model.vocab_size, c.model.sequence_length = 2, 32, 2, 320, 128
    model = models.build_model(c.model)
    params = model.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
    tok = ByteTokenizer()
    q = mathqa.parse_record(RECORD)
    example = mathqa.tokenize_example(tok, mathqa.format_prompt(q), mathqa.format_target(q), 128)

    def sums(batch):
        logits = model.apply({"params": params}, batch["inputs"])
        return loss_lib.summarize(loss_lib.cross_entropy(logits, batch["targets"], batch["weights"]))

    short = sums(mathqa.make_batch([example], batch_size=1, seq_len=len(example[0]) - 1))
    padded = sums(mathqa.make_batch([example], batch_size=3, seq_len=128))
    assert padded["loss"] == pytest.approx(short["loss"], rel=1e-6)
    assert padded["accuracy"] == pytest.approx(short["accuracy"])


def test_train_batches_are_a_function_of_seed_and_step():
    c = config_lib.default_config()
    c.mathqa.synthetic_problems = 40
    splits, _ = mathqa.load_splits(c.mathqa)
    data = mathqa.FinetuneData(splits, ByteTokenizer(), max_length=256, pad_multiple=64)
    a = data.train_batch(seed=0, step=3, batch_size=4, grad_accum=2)
    b = data.train_batch(seed=0, step=3, batch_size=4, grad_accum=2)
    assert a["inputs"].shape[:2] == (2, 4) and a["inputs"].shape[2] % 64 == 0
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["inputs"], data.train_batch(seed=0, step=4, batch_size=4, grad_accum=2)["inputs"])
    val = data.val_batches(batch_size=3)
    assert sum(int((v["weights"].sum(axis=1) > 0).sum()) for v in val) == 4
