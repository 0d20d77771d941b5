"""Faults in MathQA files: malformed rows are counted by reason and skipped, never a crash; a file that
cannot be read at all stops the run with one sentence (DataError, `error: ...` and exit 2 from the CLI)."""

import csv
import json

import pytest

from jaxllm import config as config_lib, train as train_lib
from jaxllm.data import mathqa
from jaxllm.data.sources import DataError

GOOD = {"Problem": "what is 2 + 3 ?", "Rationale": '"2 + 3 = 5"', "options": "a ) 4 , b ) 5 , c ) 6 , d ) 7 , e ) 8",
        "correct": "b", "annotated_formula": "add(n0,n1)", "linear_formula": "add(n0,n1)|", "category": "general"}


def without(field):
    return {k: v for k, v in GOOD.items() if k != field}


# (row, the reason it is counted under): every kind of malformed row a JSON list can hold
BAD_ROWS = [
    (without("Problem"), "missing Problem"),
    (without("options"), "missing options"),
    (without("correct"), "missing correct"),
    ({**GOOD, "correct": None}, "missing correct"),
    ({**GOOD, "Problem": "   "}, "empty problem"),
    ({**GOOD, "Problem": 42}, "Problem not text"),
    ({**GOOD, "options": ""}, "empty options"),
    ({**GOOD, "options": "a ) 4 , b ) 5 , c ) 6 , d ) 7"}, "not five options a-e"),
    ({**GOOD, "options": "a ) 4 , b ) 5 , c ) 6 , d ) 7 , e ) 8 , f ) 9"}, "not five options a-e"),
    ({**GOOD, "options": "['a ) 4', 'b ) 5', 'c ) 6', 'd ) 7', 'f ) 8']"}, "not five options a-e"),
    ({**GOOD, "options": "a ) 4 , b ) 5 , b ) 6 , d ) 7 , e ) 8"}, "repeated option letter"),
    ({**GOOD, "options": "['a ) 4', 'b ) 5'"}, "unreadable option list"),
    ({**GOOD, "options": "4 , 5 , 6 , 7 , 8"}, "option without a letter"),
    ({**GOOD, "correct": "f"}, "answer not a-e"),
    ({**GOOD, "correct": "b )"}, "answer not a-e"),
    ({**GOOD, "correct": ""}, "answer not a-e"),
    ("what is 2 + 3 ?", "row not an object"),
    ([GOOD["Problem"]], "row not an object"),
    (7, "row not an object"),
]
NOT_UTF8 = "\udcff"  # stands for a raw 0xff byte written into the file


def json_bytes(rows) -> bytes:
    """A JSON list file's bytes; NOT_UTF8 in a string becomes the raw byte 0xff (invalid UTF-8)."""
    return json.dumps(rows, indent=4, ensure_ascii=False).encode("utf-8", errors="surrogateescape")


def expected(reasons) -> dict:
    counts = {}
    for reason in reasons:
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def test_every_kind_of_bad_row_in_a_json_list_is_counted_by_reason(tmp_path):
    rows = [GOOD] + [row for row, _ in BAD_ROWS] + [{**GOOD, "Problem": f"what is 2 {NOT_UTF8} 3 ?"}, GOOD]
    (tmp_path / "test.json").write_bytes(json_bytes(rows))
    questions, report = mathqa.parse_records(mathqa.read_file(tmp_path / "test.json"))
    assert len(questions) == 2 and questions[0] == mathqa.parse_record(GOOD)
    assert report.summary() == {"rows": len(rows), "read": 2,
                                "skipped": expected([reason for _, reason in BAD_ROWS] + ["not UTF-8"])}


def test_jsonl_broken_and_undecodable_lines_are_counted_not_fatal(tmp_path):
    lines = [json.dumps(GOOD).encode(), b'{"Problem": "cut off mid-', json.dumps(GOOD).encode()[:-1] + b"\xff}",
             b"[1, 2", b"", b"   ", json.dumps(without("correct")).encode(), b'"just a string"',
             json.dumps({**GOOD, "Problem": "caf\u00e9 ?"}).encode(), b"\x00\x01garbage"]
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    questions, report = mathqa.parse_records(mathqa.read_file(tmp_path / "train.jsonl"))
    assert [q.problem for q in questions] == [GOOD["Problem"], "caf\u00e9 ?"]
    assert report.summary() == {"rows": 8, "read": 2, "skipped": {"broken json line": 3, "not UTF-8": 1,
                                                                 "missing correct": 1, "row not an object": 1}}


def test_csv_rows_with_undecodable_bytes_are_counted(tmp_path):
    path = tmp_path / "train_general.csv"
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as file:
        writer = csv.writer(file)
        writer.writerow(["", "Problem", "correct", "category"] + [f"option_{x}" for x in "abcde"])
        writer.writerow([0, "what is 2 + 3 ?", "b", "general", " 4 ", " 5 ", " 6 ", " 7 ", " 8 "])
        writer.writerow([1, f"what is 2 {NOT_UTF8} 3 ?", "b", "general", " 4 ", " 5 ", " 6 ", " 7 ", " 8 "])
        writer.writerow([2, "what is 2 + 3 ?", "g", "general", " 4 ", " 5 ", " 6 ", " 7 ", " 8 "])
        writer.writerow([3, "what is 2 + 3 ?", "b", "general", " 4 ", " 5 ", "", "", ""])
    _, report = mathqa.parse_records(mathqa.read_file(path))
    assert report.summary() == {"rows": 4, "read": 1, "skipped": {"not UTF-8": 1, "answer not a-e": 1,
                                                                 "not five options a-e": 1}}


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def test_parquet_rows_with_missing_values_are_counted(tmp_path):
    rows = [GOOD, {**GOOD, "options": None}, {**GOOD, "Problem": ""}, {**GOOD, "correct": "z"}]
    write_parquet(tmp_path / "test.parquet", rows)
    _, report = mathqa.parse_records(mathqa.read_file(tmp_path / "test.parquet"))
    assert report.summary() == {"rows": 4, "read": 1, "skipped": {"missing options": 1, "empty problem": 1,
                                                                 "answer not a-e": 1}}


UNREADABLE_FILES = {
    "empty.json": b"",
    "empty.jsonl": b"",
    "empty.parquet": b"",
    "empty.csv": b"",
    "blank.json": b"\n  \n",
    "cut.json": json_bytes([GOOD, GOOD])[:-40],
    "garbled.json": b"\x8b\x08\x00binary\xff\xfe",
    "scalar.json": b"42",
    "garbled.parquet": b"PAR1" + bytes(range(256)) * 4,
    "cut.parquet": None,  # a real parquet file with its footer cut off
}


@pytest.mark.parametrize("name", sorted(UNREADABLE_FILES))
def test_a_file_that_cannot_be_read_at_all_is_one_clear_sentence(tmp_path, name):
    path = tmp_path / name
    if UNREADABLE_FILES[name] is None:
        write_parquet(path, [GOOD] * 20)
        path.write_bytes(path.read_bytes()[:-30])
    else:
        path.write_bytes(UNREADABLE_FILES[name])
    with pytest.raises(DataError) as info:
        mathqa.read_file(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and len(message) - len(str(path)) < 300
    assert any(hint in message for hint in ("replace it", "check that it"))


def test_splits_report_bad_rows_by_reason_per_split(tmp_path):
    """What the fine-tune stage writes to finetune/mathqa_parse.json and the eval CLI prints."""
    (tmp_path / "train.jsonl").write_bytes(b"\n".join([json.dumps(GOOD).encode()] * 6 + [b"{broken", b"\xff\xfe"]))
    (tmp_path / "dev.json").write_bytes(json_bytes([GOOD, GOOD] + [row for row, _ in BAD_ROWS[:3]]))
    (tmp_path / "test.json").write_bytes(json_bytes([GOOD, {**GOOD, "correct": "F )"}, {**GOOD, "options": ""}]))
    c = config_lib.default_config()
    c.mathqa.source, c.mathqa.path = "local", str(tmp_path)
    splits, reports = mathqa.load_splits(c.mathqa)
    assert {name: len(qs) for name, qs in splits.items()} == {"train": 6, "val": 2, "test": 1}
    assert reports == {
        "train": {"rows": 8, "read": 6, "skipped": {"broken json line": 1, "not UTF-8": 1}},
        "val": {"rows": 5, "read": 2, "skipped": {"missing Problem": 1, "missing options": 1, "missing correct": 1}},
        "test": {"rows": 3, "read": 1, "skipped": {"answer not a-e": 1, "empty options": 1}}}


def finetune_command(tmp_path, mathqa_dir):
    """train.main on configs/tiny.py as a finetune-only run from a folder that holds no checkpoint."""
    (tmp_path / "nothing").mkdir(exist_ok=True)
    return ["--config", "configs/tiny.py", "--workdir", str(tmp_path / "run"), "--config.stages=finetune",
            f"--config.finetune.init_from={tmp_path / 'nothing'}", "--config.mathqa.source=local",
            f"--config.mathqa.path={mathqa_dir}", "--config.finetune.train.num_devices=1"]


def test_the_stage_writes_bad_row_counts_before_anything_else_can_fail(tmp_path, capsys, monkeypatch):
    """Bad rows do not stop the stage: it reads past them and writes mathqa_parse.json (here it then
    stops, as it should, on the missing checkpoint it was told to start from)."""
    monkeypatch.chdir(__import__("pathlib").Path(__file__).parents[1])
    data = tmp_path / "mathqa"
    data.mkdir()
    (data / "train.jsonl").write_bytes(b"\n".join([json.dumps(GOOD).encode()] * 8 + [b"{broken"]))
    (data / "dev.json").write_bytes(json_bytes([GOOD, without("options")]))
    (data / "test.json").write_bytes(json_bytes([GOOD, {**GOOD, "Problem": f"bad {NOT_UTF8} byte"}]))
    assert train_lib.main(finetune_command(tmp_path, data)) == 2
    err = capsys.readouterr().err
    assert "skipped 1 of 9 rows: {'broken json line': 1}" in err and "error: no checkpoint found" in err
    report = json.loads((tmp_path / "run" / "finetune" / "mathqa_parse.json").read_text())
    assert report["train"]["skipped"] == {"broken json line": 1}
    assert report["val"]["skipped"] == {"missing options": 1} and report["test"]["skipped"] == {"not UTF-8": 1}


def test_an_unreadable_file_stops_the_stage_with_one_sentence(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).parents[1])
    data = tmp_path / "mathqa"
    data.mkdir()
    (data / "train.jsonl").write_bytes(json.dumps(GOOD).encode())
    (data / "dev.json").write_bytes(json_bytes([GOOD]))
    (data / "test.json").write_bytes(b"")
    assert train_lib.main(finetune_command(tmp_path, data)) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert lines == [f"error: the MathQA file {data / 'test.json'} is empty (0 bytes); replace it with a copy that "
                     f"holds MathQA records, or remove it"]
