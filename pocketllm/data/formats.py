"""Training-data formats: load, validate and tokenize ``.jsonl`` files.

A data directory follows the mlx-lm layout: ``train.jsonl``, ``valid.jsonl`` and
``test.jsonl``, one JSON object per line, every line of a file in the same form:

* ``{"text": "..."}``                          -- plain language modelling (loss on everything)
* ``{"prompt": "...", "completion": "..."}``    -- loss on the completion (with ``mask_prompt``)
* ``{"messages": [{"role": ..., "content": ...}, ...]}``
                                               -- chat; the tokenizer's chat template is applied
                                                  and the loss is on the last (assistant) message
                                                  (with ``mask_prompt``)

Extra keys are ignored and blank lines are skipped. Every line is validated by
:func:`load_jsonl` before anything trains; problems raise :class:`DataError`, whose
message names the file, the 1-based line number and the offending field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

__all__ = [
    "DataError",
    "EncodedSplit",
    "KINDS",
    "ROLES",
    "SPLITS",
    "encode",
    "encode_all",
    "load_jsonl",
    "load_splits",
    "n_loss_tokens",
    "record_kind",
]

SPLITS = ("train", "valid", "test")
ROLES = ("system", "user", "assistant")
KINDS = ("text", "completion", "chat")

# For messages naming what each form looks like.
_FORM_KEYS = {"text": "text", "completion": "prompt/completion", "chat": "messages"}


class DataError(ValueError):
    """A problem with a data file.

    The message reads ``"<path>:<line>: field '<field>': <problem>"``; ``line`` and
    ``field`` are left out when they do not apply (a missing file, an empty file, a
    line that is not valid JSON at all). The parts are also kept as attributes.
    """

    def __init__(self, path: Any, line: int | None, field: str | None, problem: str):
        self.path = str(path) if path is not None else None
        self.line = line
        self.field = field
        self.problem = problem
        where = self.path or "<data>"
        if line is not None:
            where += f":{line}"
        msg = f"{where}: "
        if field is not None:
            msg += f"field '{field}': "
        super().__init__(msg + problem)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    return type(value).__name__


def record_kind(record: dict) -> str:
    """Which form a (validated) record has: ``"text"``, ``"completion"`` or ``"chat"``."""
    if not isinstance(record, dict):
        raise TypeError(f"expected a dict record, got {_type_name(record)}")
    if "messages" in record:
        return "chat"
    if "prompt" in record or "completion" in record:
        return "completion"
    if "text" in record:
        return "text"
    raise ValueError(
        "record has none of the keys 'text', 'prompt'+'completion' or 'messages' "
        f"(keys: {sorted(record)})"
    )


def _check_string(path, line, rec: dict, key: str, label: str | None = None) -> None:
    label = label or key
    value = rec[key]
    if not isinstance(value, str):
        raise DataError(path, line, label, f"expected a string, got {_type_name(value)}")
    if not value.strip():
        raise DataError(path, line, label, "is empty" if not value else "is only whitespace")


def _validate_record(path, line: int, rec: Any) -> str:
    """Validate one parsed line; return its kind."""
    if not isinstance(rec, dict):
        raise DataError(path, line, None, f"expected a JSON object, got {_type_name(rec)}")
    present = [k for k in ("text", "prompt", "completion", "messages") if k in rec]
    forms = []
    if "text" in rec:
        forms.append("text")
    if "prompt" in rec or "completion" in rec:
        forms.append("completion")
    if "messages" in rec:
        forms.append("chat")
    if not forms:
        raise DataError(
            path,
            line,
            None,
            "unknown record form: expected a field 'text', 'prompt'+'completion' or 'messages' "
            f"(fields found: {', '.join(map(repr, sorted(rec))) or 'none'})",
        )
    if len(forms) > 1:
        raise DataError(
            path,
            line,
            present[0],
            f"record mixes the keys of several forms ({', '.join(present)}); "
            "use exactly one of 'text', 'prompt'+'completion', 'messages'",
        )
    kind = forms[0]
    if kind == "text":
        _check_string(path, line, rec, "text")
    elif kind == "completion":
        if "completion" not in rec:
            raise DataError(path, line, "completion", "missing ('prompt' needs a 'completion')")
        if "prompt" not in rec:
            raise DataError(path, line, "prompt", "missing ('completion' needs a 'prompt')")
        _check_string(path, line, rec, "prompt")
        _check_string(path, line, rec, "completion")
    else:
        msgs = rec["messages"]
        if not isinstance(msgs, list):
            raise DataError(path, line, "messages", f"expected a list, got {_type_name(msgs)}")
        if not msgs:
            raise DataError(path, line, "messages", "is an empty list")
        for i, m in enumerate(msgs):
            name = f"messages[{i}]"
            if not isinstance(m, dict):
                raise DataError(
                    path, line, name, f"expected an object with 'role' and 'content', got {_type_name(m)}"
                )
            for key in ("role", "content"):
                if key not in m:
                    raise DataError(path, line, f"{name}.{key}", "missing")
            role = m["role"]
            if not isinstance(role, str):
                raise DataError(path, line, f"{name}.role", f"expected a string, got {_type_name(role)}")
            if role not in ROLES:
                raise DataError(
                    path, line, f"{name}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}"
                )
            _check_string(path, line, m, "content", f"{name}.content")
        last = msgs[-1]["role"]
        if last != "assistant":
            raise DataError(
                path,
                line,
                f"messages[{len(msgs) - 1}].role",
                f"the last message must be from the assistant (it is what the model learns), got {last!r}",
            )
    return kind


def read_text(path: Path) -> str:
    """A data file's text; a missing, unreadable or non-UTF-8 file is a DataError."""
    try:
        return path.read_text(encoding="utf-8-sig")  # tolerate a BOM
    except FileNotFoundError:
        raise DataError(path, None, None, "file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(path, None, None, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(path, None, None, f"cannot read file ({e.strerror or e})") from None


def json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed value) of each non-blank line of a .jsonl file."""
    # split("\n") rather than splitlines(): JSON strings may legally hold U+2028 etc.
    for lineno, raw in enumerate(read_text(path).split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield lineno, json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(path, lineno, None, f"invalid JSON: {e.msg} (column {e.colno})") from None


def load_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read and validate a ``.jsonl`` file; return its records (blank lines skipped).

    Raises :class:`DataError` on the first problem found: unreadable file, invalid
    JSON, a line that is not an object, an unknown or ambiguous form, a prompt
    without completion (or the reverse), a wrong type, an empty string, bad
    ``messages``, a file mixing forms (naming the first line that differs from the
    first record), or a file with no records at all.
    """
    path = Path(path)
    records: list[dict] = []
    first_kind: str | None = None
    first_line = 0
    for lineno, rec in json_lines(path):
        kind = _validate_record(path, lineno, rec)
        if first_kind is None:
            first_kind, first_line = kind, lineno
        elif kind != first_kind:
            raise DataError(
                path,
                lineno,
                _FORM_KEYS[kind],
                f"this record is in {kind} form but line {first_line} is in {first_kind} form "
                f"('{_FORM_KEYS[first_kind]}'); every line of a file must use the same form",
            )
        records.append(rec)
    if not records:
        raise DataError(path, None, None, "no records (the file is empty or holds only blank lines)")
    return records


def load_splits(
    data_dir: str | os.PathLike,
    splits: Sequence[str] = SPLITS,
    required: Sequence[str] = ("train",),
) -> dict[str, list[dict]]:
    """Load ``<data_dir>/<split>.jsonl`` for each split that exists.

    Splits listed in ``required`` must exist; the others are returned only when
    their file is there. Every file is fully validated (see :func:`load_jsonl`).
    """
    data_dir = Path(data_dir)
    expected = ", ".join(f"{s}.jsonl" for s in splits)
    if not data_dir.is_dir():
        what = "is not a directory" if data_dir.exists() else "does not exist"
        raise DataError(
            data_dir,
            None,
            None,
            f"data directory {what}; expected a directory holding {expected} "
            f"({', '.join(f'{s}.jsonl' for s in required) or 'none'} required)",
        )
    missing = [s for s in required if not (data_dir / f"{s}.jsonl").is_file()]
    if missing:
        raise DataError(
            data_dir,
            None,
            None,
            f"missing required file(s) {', '.join(f'{s}.jsonl' for s in missing)}; "
            f"expected {expected} in this directory",
        )
    out: dict[str, list[dict]] = {}
    for s in splits:
        p = data_dir / f"{s}.jsonl"
        if p.is_file():
            out[s] = load_jsonl(p)
    return out


# --------------------------------------------------------------------------- encoding


def _tokenize(tokenizer, text: str, *, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _encode(record: dict, tokenizer, *, mask_prompt: bool, max_seq_length: int | None):
    """Return ``(ids, n_prompt, untruncated_length)``."""
    kind = record_kind(record)
    eos = getattr(tokenizer, "eos_token_id", None)
    if kind == "text":
        ids = _tokenize(tokenizer, record["text"], add_special_tokens=True)
        prompt_ids: list[int] = []
    elif kind == "completion":
        ids = _tokenize(tokenizer, record["prompt"] + record["completion"], add_special_tokens=True)
        prompt_ids = _tokenize(tokenizer, record["prompt"], add_special_tokens=True) if mask_prompt else []
    else:
        msgs = record["messages"]
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "chat ('messages') records need a tokenizer with a chat template, and this one has none"
            )
        # The chat template already writes any BOS it wants: no special tokens on top.
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        ids = _tokenize(tokenizer, full, add_special_tokens=False)
        prompt_ids = []
        if mask_prompt and len(msgs) > 1:
            head = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
            prompt_ids = _tokenize(tokenizer, head, add_special_tokens=False)
    # BPE may merge across the prompt/completion boundary, so the prompt's own
    # tokens need not be a prefix of the full sequence: mask only the shared prefix
    # (a merged boundary token stays in the loss; nothing of the answer is masked).
    n_prompt = _common_prefix(prompt_ids, ids) if prompt_ids else 0

    if eos is not None and (not ids or ids[-1] != eos):
        # Chat templates usually close the assistant turn with the EOS token followed by
        # a newline (ChatML: "<|im_end|>\n"); the model has then already learned to stop.
        if not (kind == "chat" and eos in ids[n_prompt:]):
            ids.append(eos)

    full_len = len(ids)
    if max_seq_length is not None and len(ids) > max_seq_length:
        ids = ids[:max_seq_length]
    n_prompt = min(n_prompt, len(ids))
    return ids, n_prompt, full_len


def encode(
    record: dict, tokenizer, *, mask_prompt: bool, max_seq_length: int | None
) -> tuple[list[int], int]:
    """Tokenize one validated record; return ``(ids, n_prompt)``.

    The loss is taken on ``ids[n_prompt:]`` (the model shifts labels itself, so the
    token at position 0 is never predicted).

    * text: ``ids = tokenize(text)``, ``n_prompt = 0``.
    * completion: ``ids = tokenize(prompt + completion)``; ``n_prompt`` is the length
      of ``tokenize(prompt)`` (the part of it that is a prefix of ``ids``) when
      ``mask_prompt``, else 0.
    * chat: ``ids`` = the chat template applied to all messages; the prompt part is
      the template applied to ``messages[:-1]`` with ``add_generation_prompt=True``.

    Text and completion are tokenized with the tokenizer's own special tokens (so BOS
    is added only by tokenizers that add it themselves); chat text is tokenized
    without, as the template writes them. ``tokenizer.eos_token_id`` is appended when
    the tokenizer has one and the ids don't end with it already (for chat, also not
    when the assistant turn already holds it, as ChatML's ``<|im_end|>\\n`` does).
    Finally ``ids`` is cut to ``max_seq_length`` tokens, keeping the beginning; use
    :func:`encode_all` to learn how many records were cut.
    """
    ids, n_prompt, _ = _encode(record, tokenizer, mask_prompt=mask_prompt, max_seq_length=max_seq_length)
    return ids, n_prompt


def n_loss_tokens(ids: Sequence[int], n_prompt: int) -> int:
    """How many tokens of an encoded item the loss is taken on.

    The model predicts token ``i`` from tokens ``< i``, so position 0 is never a target.
    """
    return max(0, len(ids) - max(n_prompt, 1))


@dataclass
class EncodedSplit:
    """The tokenized records of one split.

    ``items`` holds ``(ids, n_prompt)`` for every record that has at least one token
    to learn from; records with none (the completion entirely cut off by
    ``max_seq_length``, or a one-token text) are left out and their indices into the
    input records listed in ``dropped``. ``index[i]`` is the input record of
    ``items[i]``. Use :meth:`warnings` for the lines a CLI should print once.
    """

    items: list[tuple[list[int], int]]
    n_truncated: int = 0
    n_tokens: int = 0
    n_loss_tokens: int = 0
    dropped: list[int] = field(default_factory=list)
    index: list[int] = field(default_factory=list)
    max_seq_length: int | None = None
    n_records: int = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def __iter__(self):
        return iter(self.items)

    @property
    def n_dropped(self) -> int:
        return len(self.dropped)

    def warnings(self, name: str = "data") -> list[str]:
        out = []
        if self.n_truncated:
            out.append(
                f"{name}: {self.n_truncated} of {self.n_records} records are longer than "
                f"max_seq_length={self.max_seq_length} tokens and were truncated (the end is cut off)"
            )
        if self.dropped:
            first = ", ".join(str(i + 1) for i in self.dropped[:5])
            more = ", ..." if len(self.dropped) > 5 else ""
            out.append(
                f"{name}: {len(self.dropped)} of {self.n_records} records have no tokens left to "
                f"learn from (e.g. the completion is entirely cut off by max_seq_length) and "
                f"are skipped: records {first}{more}"
            )
        return out


def encode_all(
    records: Iterable[dict],
    tokenizer,
    *,
    mask_prompt: bool,
    max_seq_length: int | None,
    name: str = "data",
) -> EncodedSplit:
    """Encode every record (see :func:`encode`); count truncations, skip records
    with nothing to learn from (reported in ``dropped`` / :meth:`EncodedSplit.warnings`).

    Raises :class:`DataError` if no record is left (``name`` labels the message).
    """
    items: list[tuple[list[int], int]] = []
    index: list[int] = []
    dropped: list[int] = []
    n_truncated = n_tokens = n_loss = 0
    n_records = 0
    for i, rec in enumerate(records):
        n_records += 1
        ids, n_prompt, full_len = _encode(
            rec, tokenizer, mask_prompt=mask_prompt, max_seq_length=max_seq_length
        )
        if full_len > len(ids):
            n_truncated += 1
        k = n_loss_tokens(ids, n_prompt)
        if k == 0:
            dropped.append(i)
            continue
        items.append((ids, n_prompt))
        index.append(i)
        n_tokens += len(ids)
        n_loss += k
    split = EncodedSplit(
        items=items,
        n_truncated=n_truncated,
        n_tokens=n_tokens,
        n_loss_tokens=n_loss,
        dropped=dropped,
        index=index,
        max_seq_length=max_seq_length,
        n_records=n_records,
    )
    if not items:
        if n_records == 0:
            raise DataError(name, None, None, "no records to encode")
        hint = (
            f"; raise max_seq_length (now {max_seq_length})"
            if max_seq_length is not None and n_truncated
            else ""
        )
        raise DataError(
            name, None, None, f"none of the {n_records} records has any token to learn from{hint}"
        )
    return split
