"""Tests for pocketllm.data.formats: loading, validation, encoding, and the shipped
example dataset. Offline: the tokenizer is built in tests/data/_tok.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pocketllm.data import (
    DataError,
    EncodedSplit,
    collate,
    encode,
    encode_all,
    load_jsonl,
    load_splits,
    n_loss_tokens,
    record_kind,
)

from ._tok import ids_of, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "personal"

BOS, EOS, IM_START, IM_END = 257, 258, 259, 260


def write(tmp_path: Path, lines, name="train.jsonl") -> Path:
    path = tmp_path / name
    text = "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines)
    path.write_text(text, encoding="utf-8")
    return path


def chat(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


# --------------------------------------------------------------------------- loading


def test_load_each_form_skips_blank_lines_and_keeps_extra_keys(tmp_path):
    p = write(tmp_path, [{"text": "hello", "id": 1}, "", "   ", {"text": "world"}])
    assert load_jsonl(p) == [{"text": "hello", "id": 1}, {"text": "world"}]

    p = write(tmp_path, [{"prompt": "2+2=", "completion": " 4", "source": "x"}])
    assert [record_kind(r) for r in load_jsonl(p)] == ["completion"]

    p = write(tmp_path, [chat(("system", "be brief"), ("user", "hi"), ("assistant", "yo"))])
    assert [record_kind(r) for r in load_jsonl(p)] == ["chat"]

    p = write(tmp_path, [{"text": "a"}])
    assert record_kind(load_jsonl(p)[0]) == "text"


def test_crlf_line_endings_are_fine(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_bytes(b'{"text": "a"}\r\n\r\n{"text": "b"}\r\n')
    assert load_jsonl(p) == [{"text": "a"}, {"text": "b"}]


BAD = [
    # (record or raw line, field (None: no field), problem text)
    ('{"text": "a"', None, "invalid JSON"),
    ("[1, 2]", None, "expected a JSON object, got list"),
    ('"just a string"', None, "expected a JSON object, got str"),
    ({"body": "x"}, None, "unknown record form"),
    ({"prompt": "q"}, "completion", "missing"),
    ({"completion": "a"}, "prompt", "missing"),
    ({"prompt": 3, "completion": "a"}, "prompt", "expected a string, got int"),
    ({"prompt": "q", "completion": 17}, "completion", "expected a string, got int"),
    ({"prompt": "q", "completion": None}, "completion", "expected a string, got null"),
    ({"prompt": "", "completion": "a"}, "prompt", "is empty"),
    ({"prompt": "q", "completion": ""}, "completion", "is empty"),
    ({"text": ""}, "text", "is empty"),
    ({"text": " \n "}, "text", "is only whitespace"),
    ({"text": ["a"]}, "text", "expected a string, got list"),
    ({"text": True}, "text", "expected a string, got bool"),
    ({"text": "a", "prompt": "q", "completion": "c"}, "text", "mixes the keys of several forms"),
    ({"messages": "hi"}, "messages", "expected a list, got str"),
    ({"messages": []}, "messages", "is an empty list"),
    ({"messages": ["hi"]}, "messages[0]", "expected an object with 'role' and 'content', got str"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role", "missing"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing"),
    ({"messages": [{"role": 1, "content": "hi"}]}, "messages[0].role", "expected a string, got int"),
    (
        {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        "messages[0].role",
        "unknown role 'bot'",
    ),
    (chat(("user", "hi"), ("assistant", "")), "messages[1].content", "is empty"),
    (chat(("user", "hi"), ("assistant", 5)), "messages[1].content", "expected a string, got int"),
    (chat(("assistant", "x"), ("user", "hi")), "messages[1].role", "the last message must be from the assistant"),
]


@pytest.mark.parametrize("bad,field,problem", BAD, ids=[f"{i}-{b[2][:20]}" for i, b in enumerate(BAD)])
def test_each_error_names_file_line_and_field(tmp_path, bad, field, problem):
    good = {"text": "ok"}  # a record's own problem is reported before any mixing of forms
    # the bad record sits on line 4, after a good line and two blank ones
    p = write(tmp_path, [good, "", "", bad, good])
    with pytest.raises(DataError) as ei:
        load_jsonl(p)
    msg = str(ei.value)
    head = f"{p}:4: " + (f"field '{field}': " if field else "")
    assert msg.startswith(head), msg
    assert problem in msg, msg
    assert ei.value.line == 4 and ei.value.field == field and ei.value.path == str(p)
    assert isinstance(ei.value, ValueError)


def test_error_message_example_from_the_spec(tmp_path):
    p = write(tmp_path, [{"prompt": "q", "completion": 3}])
    with pytest.raises(DataError, match=re.escape(f"{p}:1: field 'completion': expected a string, got int")):
        load_jsonl(p)


def test_mixing_forms_names_the_first_line_that_differs(tmp_path):
    p = write(tmp_path, [{"text": "a"}, "", {"text": "b"}, {"prompt": "q", "completion": "c"}, {"text": "d"}])
    with pytest.raises(DataError) as ei:
        load_jsonl(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:4: field 'prompt/completion': "), msg
    assert "completion form" in msg and "line 1 is in text form" in msg

    p = write(tmp_path, [chat(("user", "q"), ("assistant", "a")), {"text": "b"}])
    with pytest.raises(DataError, match=re.escape(f"{p}:2: field 'text': ") + ".*line 1 is in chat form"):
        load_jsonl(p)


def test_validation_happens_before_anything_is_returned(tmp_path):
    lines = [{"text": f"line {i}"} for i in range(50)] + [{"text": 1}]
    p = write(tmp_path, lines)
    with pytest.raises(DataError, match=":51: field 'text'"):
        load_jsonl(p)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    p = tmp_path / "valid.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=re.escape(f"{p}: no records")):
        load_jsonl(p)


def test_missing_file_and_bad_encoding(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_jsonl(tmp_path / "nope.jsonl")
    p = tmp_path / "train.jsonl"
    p.write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(DataError, match="not valid UTF-8"):
        load_jsonl(p)


def test_load_splits(tmp_path):
    write(tmp_path, [{"text": "a"}], "train.jsonl")
    write(tmp_path, [{"text": "b"}], "test.jsonl")
    splits = load_splits(tmp_path)
    assert sorted(splits) == ["test", "train"]  # valid is optional and absent
    assert splits["test"] == [{"text": "b"}]

    with pytest.raises(DataError) as ei:
        load_splits(tmp_path, required=("train", "valid"))
    msg = str(ei.value)
    assert str(tmp_path) in msg and "missing required file(s) valid.jsonl" in msg
    assert "train.jsonl, valid.jsonl, test.jsonl" in msg

    with pytest.raises(DataError) as ei:
        load_splits(tmp_path / "missing")
    msg = str(ei.value)
    assert "does not exist" in msg and "train.jsonl, valid.jsonl, test.jsonl" in msg

    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="missing required file.s. train.jsonl"):
        load_splits(tmp_path / "sub")

    # a bad optional file still fails loudly
    write(tmp_path, [{"text": 2}], "valid.jsonl")
    with pytest.raises(DataError, match=r"valid\.jsonl:1: field 'text'"):
        load_splits(tmp_path)


# --------------------------------------------------------------------------- encoding


def labels_of(ids, n_prompt):
    return collate([(ids, n_prompt)], pad_id=0)["labels"][0].tolist()


def test_encode_text():
    tok = tiny_tokenizer()
    ids, n_prompt = encode({"text": "hi there"}, tok, mask_prompt=True, max_seq_length=None)
    assert ids == ids_of("hi there") + [EOS]
    assert n_prompt == 0


def test_encode_text_bos_only_when_the_tokenizer_adds_it():
    ids, _ = encode({"text": "hi"}, tiny_tokenizer(bos=True), mask_prompt=False, max_seq_length=None)
    assert ids == [BOS] + ids_of("hi") + [EOS]
    ids, _ = encode({"text": "hi"}, tiny_tokenizer(bos=False), mask_prompt=False, max_seq_length=None)
    assert ids == ids_of("hi") + [EOS]


def test_eos_not_duplicated_and_absent_without_eos_token():
    tok = tiny_tokenizer()
    ids, _ = encode({"text": "hi</s>"}, tok, mask_prompt=False, max_seq_length=None)
    assert ids == ids_of("hi") + [EOS]
    ids, _ = encode({"text": "hi"}, tiny_tokenizer(eos=None), mask_prompt=False, max_seq_length=None)
    assert ids == ids_of("hi")


@pytest.mark.parametrize("bos", [False, True])
def test_encode_completion_masks_exactly_the_prompt(bos):
    tok = tiny_tokenizer(bos=bos)
    rec = {"prompt": "Q: 2+2?\nA:", "completion": " 4"}
    ids, n_prompt = encode(rec, tok, mask_prompt=True, max_seq_length=None)
    head = [BOS] if bos else []
    assert ids == head + ids_of("Q: 2+2?\nA: 4") + [EOS]
    assert n_prompt == len(head) + len(ids_of("Q: 2+2?\nA:"))
    labels = labels_of(ids, n_prompt)
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids_of(" 4") + [EOS]
    assert tok.decode(ids[n_prompt:]) == " 4</s>"

    ids2, n2 = encode(rec, tok, mask_prompt=False, max_seq_length=None)
    assert ids2 == ids and n2 == 0
    assert -100 not in labels_of(ids2, n2)


def test_encode_completion_bpe_merge_across_the_boundary_stays_in_the_loss():
    # "a"+"b" merge: the prompt "xa" tokenizes as [x, a], but "xab" as [x, ab]
    tok = tiny_tokenizer(merges=(("a", "b"),))
    ab = tok.convert_tokens_to_ids("ab")
    ids, n_prompt = encode({"prompt": "xa", "completion": "b"}, tok, mask_prompt=True, max_seq_length=None)
    assert ids == [ord("x"), ab, EOS]
    assert n_prompt == 1  # only the shared prefix is masked; the merged token is learned


def test_encode_chat_masks_everything_but_the_last_assistant_turn():
    tok = tiny_tokenizer()
    rec = chat(("system", "Be brief."), ("user", "hi"), ("assistant", "yo"))
    ids, n_prompt = encode(rec, tok, mask_prompt=True, max_seq_length=None)
    full = tok.apply_chat_template(rec["messages"], tokenize=False)
    head = tok.apply_chat_template(rec["messages"][:-1], tokenize=False, add_generation_prompt=True)
    assert ids == tok(full, add_special_tokens=False)["input_ids"] + [EOS]
    assert n_prompt == len(tok(head, add_special_tokens=False)["input_ids"])
    assert ids[:n_prompt] == tok(head, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[n_prompt:]) == "yo<|im_end|>\n</s>"
    assert ids[0] == IM_START and ids.count(IM_START) == 3

    ids2, n2 = encode(rec, tok, mask_prompt=False, max_seq_length=None)
    assert ids2 == ids and n2 == 0


def test_encode_chat_no_bos_doubling_and_no_extra_eos_for_chatml_eos():
    # a ChatML model whose EOS is <|im_end|>: the turn already ends with it
    tok = tiny_tokenizer(bos=True, eos="<|im_end|>")
    rec = chat(("user", "hi"), ("assistant", "yo"))
    ids, n_prompt = encode(rec, tok, mask_prompt=True, max_seq_length=None)
    assert BOS not in ids  # the template writes no BOS; the tokenizer's BOS is not added on top
    assert ids.count(IM_END) == 2
    assert tok.decode(ids[n_prompt:]) == "yo<|im_end|>\n"


def test_encode_chat_multi_turn_learns_only_the_last_reply():
    tok = tiny_tokenizer()
    rec = chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))
    ids, n_prompt = encode(rec, tok, mask_prompt=True, max_seq_length=None)
    assert tok.decode(ids[n_prompt:]) == "d<|im_end|>\n</s>"


def test_truncation_keeps_the_beginning():
    tok = tiny_tokenizer()
    ids, n_prompt = encode({"prompt": "abc", "completion": "defgh"}, tok, mask_prompt=True, max_seq_length=5)
    assert ids == ids_of("abcde") and n_prompt == 3
    ids, n_prompt = encode({"text": "abcdefgh"}, tok, mask_prompt=True, max_seq_length=4)
    assert ids == ids_of("abcd") and n_prompt == 0


def test_encode_all_counts_truncation_and_drops_records_with_nothing_to_learn():
    tok = tiny_tokenizer()
    records = [
        {"prompt": "abc", "completion": "de"},  # 6 tokens with EOS: fits max 6
        {"prompt": "abcd", "completion": "efghij"},  # truncated, completion partly kept
        {"prompt": "abcdefgh", "completion": "ij"},  # truncated inside the prompt: nothing left
        {"prompt": "abcdef", "completion": "g"},  # cut right after the prompt: nothing left
    ]
    split = encode_all(records, tok, mask_prompt=True, max_seq_length=6, name="train")
    assert isinstance(split, EncodedSplit)
    assert split.n_truncated == 3
    assert split.dropped == [2, 3] and split.n_dropped == 2
    assert split.index == [0, 1] and len(split) == 2
    assert split.items[0] == (ids_of("abcde") + [EOS], 3)
    assert split.items[1] == (ids_of("abcdef"), 4)
    assert split.n_tokens == 12
    assert split.n_loss_tokens == 3 + 2
    assert split.n_records == 4
    warns = split.warnings("train")
    assert len(warns) == 2
    assert "3 of 4 records are longer than max_seq_length=6" in warns[0]
    assert "2 of 4 records have no tokens left to learn from" in warns[1] and "records 3, 4" in warns[1]

    # without prompt masking nothing is dropped
    split = encode_all(records, tok, mask_prompt=False, max_seq_length=6)
    assert split.dropped == [] and len(split) == 4 and split.n_truncated == 3


def test_encode_all_without_truncation_has_no_warnings():
    split = encode_all([{"text": "hello"}, {"text": "hey"}], tiny_tokenizer(), mask_prompt=True, max_seq_length=None)
    assert split.n_truncated == 0 and split.dropped == [] and split.warnings() == []
    assert split.n_tokens == 6 + 4
    assert split.n_loss_tokens == 5 + 3  # position 0 is never a target


def test_encode_all_raises_when_nothing_is_left():
    tok = tiny_tokenizer()
    with pytest.raises(DataError, match=r"valid: none of the 2 records .*raise max_seq_length \(now 3\)"):
        encode_all(
            [{"prompt": "abc", "completion": "d"}, {"prompt": "abcdef", "completion": "g"}],
            tok,
            mask_prompt=True,
            max_seq_length=3,
            name="valid",
        )
    with pytest.raises(DataError, match="no records"):
        encode_all([], tok, mask_prompt=True, max_seq_length=None)


def test_n_loss_tokens():
    assert n_loss_tokens([1, 2, 3], 0) == 2
    assert n_loss_tokens([1, 2, 3], 1) == 2
    assert n_loss_tokens([1, 2, 3], 2) == 1
    assert n_loss_tokens([1, 2, 3], 3) == 0
    assert n_loss_tokens([1], 0) == 0


# --------------------------------------------------------------------------- the example dataset

LABELS = ("work", "health", "family", "money", "hobby", "home")
PROMPT_RE = re.compile(r"^Note from Maya's journal: (.+)\nCategory:$", re.S)


def _note(rec):
    m = PROMPT_RE.match(rec["prompt"])
    assert m, rec["prompt"]
    return m.group(1)


def _body(note):
    # drop a date prefix such as "Monday: " or "March 3: "
    return re.sub(r"^(\w+day|[A-Z][a-z]+ \d+): ", "", note)


def test_example_dataset_loads_validates_and_is_balanced():
    splits = load_splits(EXAMPLE, required=("train", "valid", "test"))
    assert {k: len(v) for k, v in splits.items()} == {"train": 420, "valid": 102, "test": 60}
    for name, records in splits.items():
        assert {record_kind(r) for r in records} == {"completion"}
        counts = Counter(r["completion"] for r in records)
        assert set(counts) == {" " + lab for lab in LABELS}
        assert len(set(counts.values())) == 1, (name, counts)  # balanced
        for r in records:
            note = _note(r)
            assert not re.search("|".join(LABELS), note, re.I), note  # label word never given away

    train_notes = {_note(r) for r in splits["train"]}
    train_bodies = {_body(n) for n in train_notes}
    assert len(train_notes) == 420
    for name in ("valid", "test"):
        notes = [_note(r) for r in splits[name]]
        assert len(set(notes)) == len(notes)
        assert not train_notes & set(notes)
        assert not train_bodies & {_body(n) for n in notes}  # not even with a different date prefix
    assert not {_body(_note(r)) for r in splits["valid"]} & {_body(_note(r)) for r in splits["test"]}


def test_example_dataset_encodes_with_loss_on_the_label_only():
    tok = tiny_tokenizer()
    split = encode_all(load_jsonl(EXAMPLE / "train.jsonl"), tok, mask_prompt=True, max_seq_length=512)
    assert split.n_truncated == 0 and split.dropped == [] and len(split) == 420
    assert {tok.decode(ids[n:]) for ids, n in split.items} == {f" {lab}</s>" for lab in LABELS}


def test_example_chat_dataset():
    splits = load_splits(EXAMPLE / "chat", splits=("train", "valid"), required=("train", "valid"))
    assert {k: len(v) for k, v in splits.items()} == {"train": 42, "valid": 12}
    tok = tiny_tokenizer()
    main_notes = set()
    for name in ("train", "valid", "test"):
        main_notes |= {_body(_note(r)) for r in load_jsonl(EXAMPLE / f"{name}.jsonl")}
    for records in splits.values():
        assert {record_kind(r) for r in records} == {"chat"}
        assert Counter(r["messages"][-1]["content"] for r in records).keys() == set(LABELS)
        for r in records:
            assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
            assert _body(r["messages"][1]["content"]) not in main_notes
            ids, n = encode(r, tok, mask_prompt=True, max_seq_length=None)
            assert tok.decode(ids[n:]) == r["messages"][-1]["content"] + "<|im_end|>\n</s>"


def test_make_data_regenerates_identical_bytes(tmp_path):
    out = tmp_path / "gen"
    res = subprocess.run(
        [sys.executable, str(EXAMPLE / "make_data.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    files = ["train.jsonl", "valid.jsonl", "test.jsonl", "chat/train.jsonl", "chat/valid.jsonl"]
    for f in files:
        assert (out / f).read_bytes() == (EXAMPLE / f).read_bytes(), f
    generated = sorted(str(p.relative_to(out)) for p in out.rglob("*.jsonl"))
    assert generated == sorted(files)


def test_utf8_bom_is_tolerated(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_bytes('\ufeff{"text": "a"}\n'.encode())
    assert load_jsonl(p) == [{"text": "a"}]


def test_chat_needs_a_chat_template():
    tok = tiny_tokenizer()
    bare = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="</s>")
    assert not bare.chat_template
    with pytest.raises(ValueError, match="chat template"):
        encode(chat(("user", "hi"), ("assistant", "yo")), bare, mask_prompt=True, max_seq_length=None)


def test_encoded_split_is_a_sequence_of_items():
    split = encode_all([{"text": "ab"}, {"text": "cd"}], tiny_tokenizer(), mask_prompt=True, max_seq_length=None)
    assert split[1] == split.items[1] and list(split) == split.items and split[0:1] == split.items[:1]
