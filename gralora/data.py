"""Read and validate JSONL fine-tuning datasets (chat, prompt/completion or plain text)."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from gralora.encoding import EncodedDataset, encode_records
from gralora.errors import InvalidDataset

FORMATS = ("chat", "prompt_completion", "text")
CHAT_ROLES = ("system", "user", "assistant", "tool")

MAX_KEPT_ERRORS = 50  # a report keeps the first issues; num_errors still counts them all
SUMMARY_ERRORS = 5  # issues spelled out in summary()
# One line is read into memory at a time; this bounds that line (a file with no newlines at all
# must not be read whole).
MAX_LINE_BYTES = 16 * 1024 * 1024

_T = TypeVar("_T")


@dataclass
class DataIssue:
    """One problem in the file; `line` is 1-based, 0 for the file as a whole."""

    line: int
    code: str
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line > 0 else "file"
        return f"{where}: {self.message}"


@dataclass
class DataReport:
    """What reading (and optionally tokenizing) a dataset file found."""

    format: str | None = None
    num_lines: int = 0
    num_records: int = 0  # valid records
    num_errors: int = 0  # all issues, including those not kept in `errors`
    errors: list[DataIssue] = field(default_factory=list)
    # Token statistics: None until the records were tokenized.
    max_seq_length: int | None = None
    num_examples: int | None = None  # examples left to train on (records minus dropped)
    total_tokens: int | None = None
    min_tokens: int | None = None  # per kept example, after truncation
    mean_tokens: float | None = None
    p95_tokens: int | None = None
    max_tokens: int | None = None
    num_label_tokens: int | None = None
    num_truncated: int | None = None  # cut at max_seq_length
    num_dropped: int | None = None  # no trained token left after truncation

    @property
    def ok(self) -> bool:
        """No issue, at least one record, and (if tokenized) at least one example to train on."""
        if self.num_errors or not self.num_records:
            return False
        return self.num_examples is None or self.num_examples > 0

    def add_issue(self, line: int, code: str, message: str) -> None:
        """Count an issue; keep it if fewer than MAX_KEPT_ERRORS are kept."""
        self.num_errors += 1
        if len(self.errors) < MAX_KEPT_ERRORS:
            self.errors.append(DataIssue(line, code, message))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form, with `ok`."""
        out = asdict(self)
        out["ok"] = self.ok
        return out

    def summary(self) -> str:
        """A short paragraph for a person; names the first issues' line numbers."""
        fmt = self.format or "format unknown"
        parts = [f"{self.num_records} valid {_plural(self.num_records, 'record')} ({fmt}) "
                 f"in {self.num_lines} {_plural(self.num_lines, 'line')}"]
        if self.num_errors:
            shown = "; ".join(str(issue) for issue in self.errors[:SUMMARY_ERRORS])
            more = self.num_errors - min(len(self.errors), SUMMARY_ERRORS)
            tail = f"; and {more} more" if more else ""
            parts.append(f"{self.num_errors} {_plural(self.num_errors, 'error')}: {shown}{tail}")
        if self.num_examples is not None:
            parts.append(self._token_summary())
        return "; ".join(parts) + "."

    def _token_summary(self) -> str:
        if not self.num_examples:
            return (f"no example left to train on: all {self.num_dropped} "
                    f"{_plural(self.num_dropped or 0, 'record')} lost every trained token at "
                    f"max_seq_length={self.max_seq_length} (raise it or shorten the prompts)")
        text = (f"{self.num_examples} {_plural(self.num_examples, 'example')}, "
                f"{self.total_tokens} tokens (per example min {self.min_tokens}, "
                f"mean {self.mean_tokens:.1f}, p95 {self.p95_tokens}, max {self.max_tokens}), "
                f"{self.num_label_tokens} trained")
        if self.num_truncated:
            text += f"; {self.num_truncated} truncated at {self.max_seq_length} tokens"
        if self.num_dropped:
            text += (f"; {self.num_dropped} dropped (no trained token left within "
                     f"{self.max_seq_length} tokens)")
        return text


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


def _describe(value: Any) -> str:
    """A JSON type name for messages: 'a string', 'null', 'a list'..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


class _RecordError(Exception):
    """A record-level problem found while validating one line."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def detect_format(record: dict[str, Any]) -> str | None:
    """The format a record's keys say it is in, or None."""
    if "messages" in record:
        return "chat"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


def _require_string(record: dict[str, Any], key: str, *, non_empty: bool) -> None:
    if key not in record:
        raise _RecordError("missing_field", f'missing "{key}"')
    value = record[key]
    if not isinstance(value, str):
        raise _RecordError("invalid_type", f'"{key}" must be a string, got {_describe(value)}')
    if non_empty and not value.strip():
        raise _RecordError("empty_field", f'"{key}" is empty')


def _validate_chat(record: dict[str, Any]) -> None:
    messages = record["messages"]
    if not isinstance(messages, list):
        raise _RecordError("invalid_type",
                           f'"messages" must be a list, got {_describe(messages)}')
    if not messages:
        raise _RecordError("empty_field", '"messages" is empty')
    trained_turns = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _RecordError("invalid_type",
                               f"{where} must be an object, got {_describe(message)}")
        if "role" not in message:
            raise _RecordError("missing_field", f'{where} has no "role"')
        role = message["role"]
        if not isinstance(role, str):
            raise _RecordError("invalid_type",
                               f'{where}.role must be a string, got {_describe(role)}')
        if role not in CHAT_ROLES:
            raise _RecordError("unknown_role", f"{where}.role is {role!r}; "
                                               f"expected one of {', '.join(CHAT_ROLES)}")
        if "content" not in message:
            raise _RecordError("missing_field", f'{where} ({role}) has no "content"')
        content = message["content"]
        if not isinstance(content, str):
            raise _RecordError("invalid_type", f"{where}.content must be a string, "
                                               f"got {_describe(content)}")
        weight = message.get("weight", 1)
        if isinstance(weight, bool) or weight not in (0, 1):
            raise _RecordError("invalid_type", f"{where}.weight must be 0 or 1, got {weight!r}")
        if role == "assistant" and weight == 1 and content.strip():
            trained_turns += 1
    if not trained_turns:
        raise _RecordError("no_assistant_turn",
                           "no assistant turn with non-empty content and weight 1 to train on")


def _validate(record: dict[str, Any], fmt: str) -> None:
    if fmt == "chat":
        _validate_chat(record)
    elif fmt == "prompt_completion":
        _require_string(record, "prompt", non_empty=False)
        _require_string(record, "completion", non_empty=True)
    else:
        _require_string(record, "text", non_empty=True)


def _raw_lines(path: Path) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes without the newline) one at a time; None for an over-long line."""
    with path.open("rb") as handle:
        number = 0
        while True:
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                # Skip the rest of the line without holding it.
                while raw and not raw.endswith(b"\n"):
                    raw = handle.readline(MAX_LINE_BYTES)
                yield number, None
                continue
            yield number, raw.rstrip(b"\r\n")


def _read(path: Path, max_rows: int | None) -> tuple[list[dict[str, Any]], DataReport]:
    report = DataReport()
    records: list[dict[str, Any]] = []
    format_line = 0
    rows = 0
    for number, raw in _raw_lines(path):
        report.num_lines = number
        if raw is None:
            report.add_issue(number, "line_too_long",
                             f"line is longer than {MAX_LINE_BYTES} bytes")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            report.add_issue(number, "invalid_encoding",
                             f"not UTF-8 (byte {raw[exc.start]:#04x} at offset {exc.start}); "
                             "save the file as UTF-8")
            continue
        if number == 1:
            text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
        if not text.strip():
            continue
        rows += 1
        if max_rows is not None and rows > max_rows:
            report.add_issue(number, "too_many_rows",
                             f"more than {max_rows} rows (the limit); reading stopped here")
            break
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            report.add_issue(number, "invalid_json",
                             f"invalid JSON: {exc.msg} at column {exc.colno}")
            continue
        if not isinstance(record, dict):
            report.add_issue(number, "not_an_object",
                             f"expected a JSON object, got {_describe(record)}")
            continue
        fmt = detect_format(record)
        if fmt is None:
            keys = ", ".join(sorted(record)) or "none"
            report.add_issue(number, "unknown_format",
                             'expected a "messages", "prompt"/"completion" or "text" key; '
                             f"found keys: {keys}")
            continue
        if report.format is not None and fmt != report.format:
            report.add_issue(number, "mixed_formats",
                             f"a {fmt} record in a {report.format} file "
                             f"(format set by line {format_line})")
            continue
        try:
            _validate(record, fmt)
        except _RecordError as exc:
            report.add_issue(number, exc.code, exc.message)
            continue
        if report.format is None:
            report.format, format_line = fmt, number
        records.append(record)
    report.num_records = len(records)
    if report.num_records == 0 and report.num_errors == 0:
        report.add_issue(0, "empty_file", "no records (the file is empty or all blank lines)")
    return records, report


def read_records(path: Path, *,
                 max_rows: int | None = None) -> tuple[list[dict[str, Any]], DataReport]:
    """Read and validate a JSONL file line by line; the valid records and the report."""
    return _read(Path(path), max_rows)


def _percentile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile of a non-empty sorted sequence."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def _tokenize(records: Sequence[dict[str, Any]], report: DataReport, tokenizer: Any,
              max_seq_length: int) -> EncodedDataset:
    """Encode the records and write the token statistics into `report`."""
    # With records, the format is known; with none, any format encodes nothing.
    dataset = encode_records(records, report.format or "text", tokenizer, max_seq_length)
    lengths = sorted(len(example["input_ids"]) for example in dataset.examples)
    report.max_seq_length = max_seq_length
    report.num_examples = len(dataset)
    report.total_tokens = dataset.num_tokens
    report.num_label_tokens = dataset.num_label_tokens
    report.num_truncated = dataset.num_truncated
    report.num_dropped = dataset.num_dropped
    if lengths:
        report.min_tokens = lengths[0]
        report.max_tokens = lengths[-1]
        report.mean_tokens = round(sum(lengths) / len(lengths), 2)
        report.p95_tokens = _percentile(lengths, 0.95)
    return dataset


def validate_file(path: Path, tokenizer: Any = None, *, max_seq_length: int = 1024,
                  max_rows: int | None = None) -> DataReport:
    """Validate a JSONL dataset; with a tokenizer, also report token statistics."""
    records, report = _read(Path(path), max_rows)
    if tokenizer is not None and records:
        _tokenize(records, report, tokenizer, max_seq_length)
    return report


def raise_if_invalid(report: DataReport) -> None:
    """Raise InvalidDataset (message: the summary; details["report"]) unless the report is ok."""
    if not report.ok:
        raise InvalidDataset(report.summary(), details={"report": report.to_dict()})


def load_dataset(path: Path, tokenizer: Any, *, max_seq_length: int,
                 max_rows: int | None = None) -> tuple[EncodedDataset, DataReport]:
    """Read, validate and tokenize a dataset; InvalidDataset on any issue or no example."""
    records, report = _read(Path(path), max_rows)
    raise_if_invalid(report)  # no point tokenizing a file that will be refused
    dataset = _tokenize(records, report, tokenizer, max_seq_length)
    raise_if_invalid(report)
    return dataset, report


def split_records(records: Sequence[_T], fraction: float,
                  seed: int) -> tuple[list[_T], list[_T]]:
    """A deterministic (train, validation) split holding out about `fraction` of the records."""
    if not 0.0 <= fraction < 1.0:
        raise InvalidDataset(f"validation fraction must be in [0, 1), got {fraction!r}",
                             field="validation_split")
    n = len(records)
    if fraction == 0.0 or n < 2:
        return list(records), []
    n_validation = max(1, round(n * fraction))
    if n_validation >= n:
        raise InvalidDataset(
            f"validation fraction {fraction} of {n} records leaves no training record",
            field="validation_split",
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_validation])
    # Both halves keep the file's order.
    train = [r for i, r in enumerate(records) if i not in held_out]
    validation = [r for i, r in enumerate(records) if i in held_out]
    return train, validation
