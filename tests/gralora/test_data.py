"""Dataset reading and validation: formats, line-numbered issues, token statistics, splits."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from gralora import data
from gralora.data import (
    DataReport,
    load_dataset,
    raise_if_invalid,
    read_records,
    split_records,
    validate_file,
)
from gralora.encoding import IGNORE_INDEX
from gralora.errors import InvalidDataset
from gralora.tiny import build_tiny_tokenizer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tiny_tokenizer()


def chat(user: str = "hi", assistant: str = "hello", system: str | None = None) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def write(tmp_path: Path, *lines: Any, name: str = "data.jsonl") -> Path:
    """Write one line per item: dicts as JSON, strings verbatim."""
    path = tmp_path / name
    text = "".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


def issues(report: DataReport) -> list[tuple[int, str]]:
    return [(issue.line, issue.code) for issue in report.errors]


# -- formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        (chat(), "chat"),
        ({"prompt": "2+2=", "completion": "4"}, "prompt_completion"),
        ({"text": "some text"}, "text"),
    ],
)
def test_format_is_detected(tmp_path: Path, record: dict[str, Any], fmt: str) -> None:
    records, report = read_records(write(tmp_path, record, record))
    assert report.format == fmt
    assert report.ok
    assert records == [record, record]
    assert (report.num_lines, report.num_records, report.num_errors) == (2, 2, 0)


def test_extra_keys_are_ignored(tmp_path: Path) -> None:
    record = {"messages": [{"role": "user", "content": "hi", "name": "bob"},
                           {"role": "assistant", "content": "yo", "weight": 1}],
              "id": 7, "tools": []}
    _, report = read_records(write(tmp_path, record, {"text": "x", "messages": chat()["messages"]}))
    assert report.ok and report.num_records == 2


def test_blank_lines_are_skipped_but_counted_in_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, "", chat(), "   ", "\t", chat(), "", "{oops", "")
    records, report = read_records(path)
    assert len(records) == 2
    assert report.num_lines == 8
    assert issues(report) == [(7, "invalid_json")]


def test_crlf_line_endings_and_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "win.jsonl"
    body = json.dumps({"text": "caf\u00e9"}) + "\r\n" + json.dumps({"text": "b"}) + "\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    records, report = read_records(path)
    assert report.ok, report.summary()
    assert records[0]["text"] == "caf\u00e9"


def test_format_comes_from_first_valid_record(tmp_path: Path) -> None:
    path = write(tmp_path, {"text": ""}, chat(), {"text": "now valid but too late"}, chat())
    records, report = read_records(path)
    assert report.format == "chat"
    assert issues(report) == [(1, "empty_field"), (3, "mixed_formats")]
    assert len(records) == 2
    assert "line 2" in report.errors[1].message  # says which line set the format


def test_mixed_formats_reported_on_each_line(tmp_path: Path) -> None:
    path = write(tmp_path, {"prompt": "a", "completion": "b"}, {"text": "t"}, chat(),
                 {"prompt": "c", "completion": "d"})
    records, report = read_records(path)
    assert report.format == "prompt_completion"
    assert issues(report) == [(2, "mixed_formats"), (3, "mixed_formats")]
    assert len(records) == 2


# -- every issue code, with its line -------------------------------------------------------------


def msgs(*pairs: Any) -> dict[str, Any]:
    return {"messages": [dict(p) for p in pairs]}


BAD_LINES: list[tuple[str, Any, str]] = [
    ("invalid_json", '{"text": "unterminated}', "invalid JSON"),
    ("invalid_json", "{'text': 'single quotes'}", "invalid JSON"),
    ("not_an_object", "[1, 2]", "a list"),
    ("not_an_object", '"just a string"', "a string"),
    ("unknown_format", {"input": "x", "output": "y"}, "input, output"),
    ("missing_field", msgs({"role": "user", "content": "hi"}, {"role": "assistant"}),
     'messages[1] (assistant) has no "content"'),
    ("missing_field", msgs({"content": "hi"}), 'messages[0] has no "role"'),
    ("missing_field", {"prompt": "p"}, '"completion"'),
    ("missing_field", {"completion": "c"}, '"prompt"'),
    ("invalid_type", {"messages": "hello"}, '"messages" must be a list'),
    ("invalid_type", msgs({"role": "user", "content": [{"type": "text", "text": "hi"}]}),
     "messages[0].content must be a string"),
    ("invalid_type", msgs({"role": "assistant", "content": None}), "got null"),
    ("invalid_type", msgs({"role": 3, "content": "hi"}), "messages[0].role"),
    ("invalid_type", {"messages": ["hi"]}, "messages[0] must be an object"),
    ("invalid_type", msgs({"role": "assistant", "content": "a", "weight": 2}), "weight"),
    ("invalid_type", {"text": 42}, '"text" must be a string, got a number'),
    ("invalid_type", {"prompt": "p", "completion": ["c"]}, '"completion" must be a string'),
    ("empty_field", {"text": ""}, '"text" is empty'),
    ("empty_field", {"text": "  \n "}, '"text" is empty'),
    ("empty_field", {"prompt": "p", "completion": ""}, '"completion" is empty'),
    ("empty_field", {"messages": []}, '"messages" is empty'),
    ("unknown_role", msgs({"role": "human", "content": "hi"}), "'human'"),
    ("no_assistant_turn", msgs({"role": "system", "content": "s"},
                               {"role": "user", "content": "u"}), "no assistant turn"),
    ("no_assistant_turn", msgs({"role": "user", "content": "u"},
                               {"role": "assistant", "content": "   "}), "no assistant turn"),
    ("no_assistant_turn", msgs({"role": "user", "content": "u"},
                               {"role": "assistant", "content": "a", "weight": 0}),
     "weight 1"),
]


@pytest.mark.parametrize(("code", "bad", "needle"), BAD_LINES,
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(BAD_LINES)])
def test_issue_code_and_line(tmp_path: Path, code: str, bad: Any, needle: str) -> None:
    # Valid neighbours of the bad line's own format, so that no mixed_formats issue appears.
    good: dict[str, Any] = chat()
    if isinstance(bad, dict) and ("prompt" in bad or "completion" in bad):
        good = {"prompt": "ok", "completion": "fine"}
    elif isinstance(bad, dict) and "text" in bad:
        good = {"text": "fine"}
    records, report = read_records(write(tmp_path, good, "", bad, good))
    assert issues(report) == [(3, code)], report.summary()
    assert needle in report.errors[0].message
    assert len(records) == 2
    assert not report.ok


def test_empty_file(tmp_path: Path) -> None:
    for body in ("", "\n\n  \n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(body)
        records, report = read_records(path)
        assert records == []
        assert issues(report) == [(0, "empty_file")]
        assert "no records" in report.summary()
        assert not report.ok


def test_file_of_only_bad_lines_is_not_also_empty(tmp_path: Path) -> None:
    _, report = read_records(write(tmp_path, "nope", "[]"))
    assert issues(report) == [(1, "invalid_json"), (2, "not_an_object")]
    assert report.format is None and not report.ok


def test_non_utf8_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        json.dumps({"text": "ok"}).encode() + b"\n"
        + '{"text": "caf\u00e9"}'.encode("latin-1") + b"\n"
        + json.dumps({"text": "\u00e9t\u00e9"}, ensure_ascii=False).encode("utf-8") + b"\n"
    )
    records, report = read_records(path)
    assert issues(report) == [(2, "invalid_encoding")]
    assert "UTF-8" in report.errors[0].message and "0xe9" in report.errors[0].message
    assert [r["text"] for r in records] == ["ok", "\u00e9t\u00e9"]


def test_max_rows_stops_reading(tmp_path: Path) -> None:
    rows = [{"text": f"row {i}"} for i in range(5)]
    path = write(tmp_path, rows[0], "", rows[1], rows[2], rows[3], "not json", rows[4])
    records, report = read_records(path, max_rows=3)
    assert [r["text"] for r in records] == ["row 0", "row 1", "row 2"]
    # Blank lines are not rows; the fourth row is on line 5; nothing after it is read.
    assert issues(report) == [(5, "too_many_rows")]
    assert "3" in report.errors[0].message
    assert report.num_lines == 5
    assert not report.ok


def test_max_rows_exactly_reached_is_fine(tmp_path: Path) -> None:
    path = write(tmp_path, {"text": "a"}, {"text": "b"}, "")
    _, report = read_records(path, max_rows=2)
    assert report.ok


def test_over_long_line_is_skipped_without_holding_it(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "MAX_LINE_BYTES", 64)
    path = write(tmp_path, {"text": "short"}, {"text": "x" * 500}, {"text": "after"})
    records, report = read_records(path)
    assert issues(report) == [(2, "line_too_long")]
    assert [r["text"] for r in records] == ["short", "after"]


def test_reading_streams_instead_of_loading_the_file(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, *[{"text": f"t{i}"} for i in range(3)])

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("the whole file was read at once")

    monkeypatch.setattr(Path, "read_text", refuse)
    monkeypatch.setattr(Path, "read_bytes", refuse)
    records, _ = read_records(path)
    assert len(records) == 3


def test_only_the_first_50_issues_are_kept(tmp_path: Path) -> None:
    path = write(tmp_path, *(["{bad"] * 60), {"text": "ok"})
    records, report = read_records(path)
    assert report.num_errors == 60
    assert len(report.errors) == 50
    assert report.errors[-1].line == 50
    assert len(records) == 1
    assert "and 55 more" in report.summary()  # five spelled out


# -- report shape and summary ------------------------------------------------------------------


def test_summary_names_lines_and_counts(tmp_path: Path) -> None:
    path = write(tmp_path, chat(), chat(), {"messages": [{"role": "bot", "content": "x"}]},
                 chat(), "{")
    _, report = read_records(path)
    text = report.summary()
    assert "3 valid records (chat)" in text
    assert "2 errors" in text
    assert "line 3: messages[0].role is 'bot'" in text
    assert "line 5: invalid JSON" in text


def test_to_dict_is_json_friendly(tmp_path: Path, tokenizer: Any) -> None:
    report = validate_file(write(tmp_path, chat(), "{"), tokenizer, max_seq_length=64)
    out = json.loads(json.dumps(report.to_dict()))
    assert out["ok"] is False
    assert out["format"] == "chat"
    assert out["errors"] == [{"line": 2, "code": "invalid_json",
                              "message": report.errors[0].message}]
    assert out["num_examples"] == 1 and out["total_tokens"] > 0


def test_no_tokenizer_means_no_token_stats(tmp_path: Path) -> None:
    report = validate_file(write(tmp_path, chat()))
    assert report.ok
    assert report.num_examples is None and report.total_tokens is None
    assert "token" not in report.summary()


# -- tokens ------------------------------------------------------------------------------------


def test_token_stats_and_truncation(tmp_path: Path, tokenizer: Any) -> None:
    texts = ["hello", "hello how are you today", "the quick brown fox jumps over the lazy dog",
             "what is the weather like", "i am fine thank you and you"]
    max_len = 6
    # Text examples are the tokenizer's ids plus an end-of-sequence token, all trained on.
    full = [len(tokenizer(t)["input_ids"]) + 1 for t in texts]
    assert min(full) <= max_len < max(full)  # the data exercises truncation
    kept = sorted(min(n, max_len) for n in full)

    report = validate_file(write(tmp_path, *[{"text": t} for t in texts]), tokenizer,
                           max_seq_length=max_len)
    assert report.ok, report.summary()
    assert report.num_examples == len(texts)
    assert report.total_tokens == sum(kept)
    assert report.num_label_tokens == sum(kept)
    assert (report.min_tokens, report.max_tokens) == (kept[0], kept[-1])
    assert report.mean_tokens == pytest.approx(sum(kept) / len(kept), abs=0.01)
    assert report.p95_tokens == kept[math.ceil(0.95 * len(kept)) - 1]
    assert report.num_truncated == sum(1 for n in full if n > max_len)
    assert report.num_dropped == 0
    assert f"{report.num_truncated} truncated at {max_len} tokens" in report.summary()


def test_p95_is_the_nearest_rank_length(tmp_path: Path, tokenizer: Any) -> None:
    texts = [" ".join(["hello"] * k) for k in range(1, 41)]
    lengths = sorted(len(tokenizer(t)["input_ids"]) + 1 for t in texts)
    assert lengths[37] < lengths[39]  # distinct enough that the rank matters
    report = validate_file(write(tmp_path, *[{"text": t} for t in texts]), tokenizer,
                           max_seq_length=1024)
    assert report.p95_tokens == lengths[37]  # ceil(0.95 * 40) = 38th of 40
    assert report.num_truncated == 0


def test_chat_whose_answer_is_cut_off_is_dropped(tmp_path: Path, tokenizer: Any) -> None:
    long_user = "the quick brown fox jumps over the lazy dog " * 10
    path = write(tmp_path, chat("hi", "hello"), chat(long_user, "a long way down"))
    report = validate_file(path, tokenizer, max_seq_length=32)
    assert report.num_dropped == 1
    assert report.num_truncated == 1
    assert report.num_examples == 1
    assert report.ok  # one example is left to train on
    assert "1 dropped" in report.summary()


def test_load_dataset_refuses_when_every_example_is_dropped(tmp_path: Path,
                                                            tokenizer: Any) -> None:
    long_user = "hello how are you today " * 20
    path = write(tmp_path, chat(long_user, "fine"), chat(long_user, "good"))
    with pytest.raises(InvalidDataset) as caught:
        load_dataset(path, tokenizer, max_seq_length=16)
    assert "max_seq_length=16" in caught.value.message
    assert caught.value.details["report"]["num_dropped"] == 2


def labelled_text(tokenizer: Any, example: dict[str, list[int]]) -> str:
    ids = [label for label in example["labels"] if label != IGNORE_INDEX]
    return str(tokenizer.decode(ids))


def test_chat_loss_only_on_trained_assistant_turns(tmp_path: Path, tokenizer: Any) -> None:
    record = {"messages": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Five, surely.", "weight": 0},
        {"role": "user", "content": "Try again please."},
        {"role": "assistant", "content": "It is four."},
    ]}
    dataset, report = load_dataset(write(tmp_path, record), tokenizer, max_seq_length=256)
    assert len(dataset) == 1 == report.num_examples
    example = dataset[0]
    assert len(example["labels"]) == len(example["input_ids"]) == len(example["attention_mask"])
    trained = labelled_text(tokenizer, example)
    assert "It is four." in trained
    for untrained in ("Be kind.", "What is two plus two?", "Five, surely.", "Try again please.",
                      "user", "system"):
        assert untrained not in trained
    # Labels equal the input ids where set.
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        assert label in (IGNORE_INDEX, token)
    assert report.num_label_tokens == sum(1 for x in example["labels"] if x != IGNORE_INDEX)


def test_prompt_completion_loss_only_on_completion(tmp_path: Path, tokenizer: Any) -> None:
    path = write(tmp_path, {"prompt": "Question: what is the weather like?\nAnswer:",
                            "completion": " sunny and warm"})
    dataset, _ = load_dataset(path, tokenizer, max_seq_length=256)
    trained = labelled_text(tokenizer, dataset[0])
    assert "sunny and warm" in trained
    assert "weather" not in trained and "Question" not in trained


# -- load_dataset and raise_if_invalid ---------------------------------------------------------


def test_load_dataset_returns_examples(tmp_path: Path, tokenizer: Any) -> None:
    path = write(tmp_path, *[chat(f"question {i}", f"answer {i}") for i in range(4)])
    dataset, report = load_dataset(path, tokenizer, max_seq_length=128)
    assert len(dataset) == 4 == report.num_examples
    assert dataset.stats()["num_records"] == 4
    assert report.ok


def test_load_dataset_error_names_lines(tmp_path: Path, tokenizer: Any) -> None:
    path = write(tmp_path, chat(), "{", chat(), {"messages": [{"role": "user", "content": "u"}]})
    with pytest.raises(InvalidDataset) as caught:
        load_dataset(path, tokenizer, max_seq_length=64)
    err = caught.value
    assert err.code == "invalid_dataset"
    assert "line 2" in err.message and "line 4" in err.message
    assert err.details["report"]["num_errors"] == 2
    assert [e["line"] for e in err.details["report"]["errors"]] == [2, 4]


def test_raise_if_invalid(tmp_path: Path) -> None:
    _, good = read_records(write(tmp_path, chat()))
    raise_if_invalid(good)
    _, bad = read_records(write(tmp_path, "[]", name="bad.jsonl"))
    with pytest.raises(InvalidDataset, match="line 1"):
        raise_if_invalid(bad)


# -- split -------------------------------------------------------------------------------------


def test_split_is_deterministic_and_partitions() -> None:
    records = list(range(40))
    train, validation = split_records(records, 0.25, seed=1)
    assert (train, validation) == split_records(records, 0.25, seed=1)
    assert len(validation) == 10 and len(train) == 30
    assert sorted(train + validation) == records
    assert train == sorted(train) and validation == sorted(validation)  # file order kept
    assert validation != split_records(records, 0.25, seed=2)[1]
    assert validation != list(range(30, 40))  # shuffled, not the tail


def test_split_edges() -> None:
    assert split_records([1, 2, 3], 0.0, seed=0) == ([1, 2, 3], [])
    assert split_records([1], 0.5, seed=0) == ([1], [])
    train, validation = split_records([1, 2], 0.01, seed=0)  # at least one held out
    assert len(train) == 1 and len(validation) == 1
    with pytest.raises(InvalidDataset, match="no training record"):
        split_records([1, 2], 0.9, seed=0)
    for bad in (-0.1, 1.0):
        with pytest.raises(InvalidDataset) as caught:
            split_records([1, 2, 3], bad, seed=0)
        assert caught.value.field == "validation_split"


# -- examples/ -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt", "minimum"),
    [
        ("chat.jsonl", "chat", 35),
        ("prompt_completion.jsonl", "prompt_completion", 25),
        ("text.jsonl", "text", 25),
    ],
)
def test_example_files_validate(tokenizer: Any, name: str, fmt: str, minimum: int) -> None:
    # 128: the sequence length the README quickstart trains with.
    report = validate_file(EXAMPLES / name, tokenizer, max_seq_length=128)
    assert report.ok, report.summary()
    assert report.format == fmt
    assert report.num_records >= minimum
    assert report.num_dropped == 0


def test_example_chat_file_is_varied() -> None:
    records, _ = read_records(EXAMPLES / "chat.jsonl")
    with_system = [r for r in records if r["messages"][0]["role"] == "system"]
    multi_turn = [r for r in records
                  if sum(m["role"] == "assistant" for m in r["messages"]) > 1]
    assert len(with_system) >= 5 and len(multi_turn) >= 3


def test_bad_example_file(tokenizer: Any) -> None:
    report = validate_file(EXAMPLES / "bad.jsonl", tokenizer, max_seq_length=128)
    assert issues(report) == [(2, "invalid_json"), (3, "missing_field"), (4, "unknown_role"),
                              (5, "no_assistant_turn"), (6, "mixed_formats")]
    with pytest.raises(InvalidDataset) as caught:
        load_dataset(EXAMPLES / "bad.jsonl", tokenizer, max_seq_length=128)
    for line in (2, 3, 4, 5, 6):
        assert f"line {line}:" in caught.value.message
