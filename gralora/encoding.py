"""Tokenize records into input_ids/labels with loss only on assistant and completion tokens."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# The label value the loss ignores (torch.nn.CrossEntropyLoss's default ignore_index).
IGNORE_INDEX = -100

Span = tuple[int, int]  # [start, end) character offsets into the rendered text


@dataclass
class EncodedExample:
    """One tokenized example: ids, labels (-100 where no loss) and whether it was cut."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_label_tokens(self) -> int:
        """Tokens that carry loss."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)

    def to_features(self) -> dict[str, list[int]]:
        """The dict the collator consumes."""
        return {
            "input_ids": self.input_ids,
            "labels": self.labels,
            "attention_mask": [1] * len(self.input_ids),
        }


@dataclass
class EncodedDataset:
    """Tokenized examples plus the counts a user wants to see (a torch-style map dataset)."""

    examples: list[dict[str, list[int]]] = field(default_factory=list)
    num_records: int = 0
    num_truncated: int = 0  # examples cut at max_seq_length (kept if a label survived)
    num_dropped: int = 0  # examples with no label token left (after truncation), not trained on
    num_tokens: int = 0
    num_label_tokens: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]

    def stats(self) -> dict[str, int]:
        """JSON-friendly counts."""
        return {
            "num_records": self.num_records,
            "num_examples": len(self.examples),
            "num_truncated": self.num_truncated,
            "num_dropped": self.num_dropped,
            "num_tokens": self.num_tokens,
            "num_label_tokens": self.num_label_tokens,
        }


def _render_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *,
                 add_generation_prompt: bool = False) -> str:
    """The chat template's text for these messages (no tokenization)."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = tokenizer.apply_chat_template(
        plain, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return str(text)


def chat_assistant_spans(tokenizer: Any,
                         messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[Span]]:
    """Render a conversation and return the character spans of its trained assistant turns."""
    text = _render_chat(tokenizer, messages)
    spans: list[Span] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        # OpenAI's format lets a turn opt out of training with weight 0.
        if message.get("weight", 1) == 0:
            continue
        before = _render_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = _render_chat(tokenizer, messages[: i + 1])
        content = str(message.get("content", ""))
        nested = text.startswith(before) and text.startswith(through)
        if i and nested and len(through) > len(before):
            start = len(before)
            # The turn's end-of-turn token is learned (the model must learn to stop); the
            # whitespace the template puts after it is not.
            end = len(through.rstrip())
        else:
            # A template whose prefixes do not nest (e.g. one that injects a default system
            # prompt only once): fall back to finding the content itself.
            start = text.find(content, cursor)
            if start < 0:
                continue
            end = start + len(content)
        if end > start:
            spans.append((start, end))
            cursor = end
    return text, spans


def _tokenize_with_spans(tokenizer: Any, text: str, spans: Sequence[Span], *,
                         add_special_tokens: bool) -> tuple[list[int], list[int]]:
    """Tokenize `text`; label every token that overlaps one of `spans`."""
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
    labels = [IGNORE_INDEX] * len(ids)
    for idx, (tok_start, tok_end) in enumerate(offsets):
        if tok_end <= tok_start:
            continue  # added special tokens have an empty span: never trained on here
        if any(tok_start < s_end and tok_end > s_start for s_start, s_end in spans):
            labels[idx] = ids[idx]
    return ids, labels


def _eos_id(tokenizer: Any) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None)
    return int(eos) if eos is not None else None


def encode_record(record: Mapping[str, Any], fmt: str, tokenizer: Any,
                  max_seq_length: int) -> EncodedExample:
    """Tokenize one record of format "chat", "prompt_completion" or "text"."""
    if fmt == "chat":
        text, spans = chat_assistant_spans(tokenizer, record["messages"])
        # The template writes its own special tokens (bos, turn markers).
        ids, labels = _tokenize_with_spans(tokenizer, text, spans, add_special_tokens=False)
    elif fmt == "prompt_completion":
        prompt, completion = str(record["prompt"]), str(record["completion"])
        ids, labels = _tokenize_with_spans(
            tokenizer, prompt + completion, [(len(prompt), len(prompt) + len(completion))],
            add_special_tokens=True,
        )
        eos = _eos_id(tokenizer)
        # The model must learn to stop after the completion.
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
            labels.append(eos)
    elif fmt == "text":
        enc = tokenizer(str(record["text"]), add_special_tokens=True)
        ids = list(enc["input_ids"])
        eos = _eos_id(tokenizer)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        labels = list(ids)
    else:
        raise ValueError(f"unknown record format {fmt!r}")
    truncated = len(ids) > max_seq_length
    return EncodedExample(ids[:max_seq_length], labels[:max_seq_length], truncated)


def encode_records(records: Sequence[Mapping[str, Any]], fmt: str, tokenizer: Any,
                   max_seq_length: int) -> EncodedDataset:
    """Tokenize every record; count truncated examples and drop those left without a label."""
    out = EncodedDataset(num_records=len(records))
    for record in records:
        example = encode_record(record, fmt, tokenizer, max_seq_length)
        if example.truncated:
            out.num_truncated += 1
        if example.num_label_tokens == 0:
            out.num_dropped += 1
            continue
        out.examples.append(example.to_features())
        out.num_tokens += len(example.input_ids)
        out.num_label_tokens += example.num_label_tokens
    return out


class PaddingCollator:
    """Right-pad a batch to its longest example; padding gets label -100 and mask 0."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def for_tokenizer(cls, tokenizer: Any,
                      pad_to_multiple_of: int | None = None) -> PaddingCollator:
        """A collator padding with the tokenizer's pad token (else eos, else 0)."""
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = _eos_id(tokenizer)
        return cls(int(pad) if pad is not None else 0, pad_to_multiple_of)

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, Any]:
        import torch

        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        input_ids, labels, mask = [], [], []
        for f in features:
            pad = length - len(f["input_ids"])
            input_ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            mask.append(list(f.get("attention_mask", [1] * len(f["input_ids"]))) + [0] * pad)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
        }
