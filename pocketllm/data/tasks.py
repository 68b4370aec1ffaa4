"""Prompt-based classification tasks: readers, templates and verbalizers (MeZO / LM-BFF).

Zeroth-order fine-tuning works because the prompt already frames the task: a template turns an
example into text that ends where the answer goes, and the label words ("great" / "terrible")
are read at that one position. A task here is a reader for its public file format, a template
for causal LMs and one with a mask for masked LMs, and either label words (classification) or
candidate continuations scored by their log-likelihood (multiple choice: COPA).

The templates follow the MeZO paper's OPT templates (princeton-nlp/MeZO, large_models/
templates.py) for causal LMs and LM-BFF's manual templates for masked LMs; see TASKS below.
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .formats import DataError, json_lines, read_text

MASK = "{mask}"  # where a masked-LM template puts the tokenizer's mask token


@dataclass
class Example:
    """One labelled example: the raw fields, the class index, and where it came from."""

    fields: dict[str, str]
    label: int
    where: str = ""  # "file:line", for error messages


@dataclass
class Task:
    """A task's format, prompt and answer space.

    `causal(fields)` returns the prompt (ending just before the answer) for causal LMs and
    `masked(fields)` one containing MASK for masked LMs. Classification tasks have
    `label_words` (one per class, read at the answer position); multiple-choice tasks have
    `candidates(fields)` instead, the continuations whose log-likelihood is compared."""

    name: str
    classes: tuple[str, ...]                 # label values as they appear in the files
    causal: Callable[[dict], str]
    masked: Callable[[dict], str] | None = None
    label_words: tuple[str, ...] = ()        # causal label words (with their leading space)
    masked_label_words: tuple[str, ...] = ()
    candidates: Callable[[dict], list[str]] | None = None
    files: dict[str, str] = field(default_factory=dict)  # split -> file name
    reader: str = "jsonl"                    # jsonl | tsv | trec
    text_fields: tuple[str, ...] = ()
    metric: str = "accuracy"                 # and macro-F1 where classes are unbalanced (CB)

    @property
    def multiple_choice(self) -> bool:
        return self.candidates is not None

    def words(self, masked: bool) -> tuple[str, ...]:
        return self.masked_label_words if masked else self.label_words


def _strip_period(s: str) -> str:
    s = s.strip()
    return s[:-1] if s.endswith((".", "!", "?")) else s


def _copa_prompt(f: dict) -> str:
    # "The man turned on the faucet so" / "... because": the connector follows the premise.
    return _strip_period(f["premise"]) + (" so" if f["question"] == "effect" else " because")


def _copa_candidates(f: dict) -> list[str]:
    # lower-cased first letter: the candidate continues the premise's sentence
    return [" " + c[0].lower() + c[1:] for c in (f["choice1"], f["choice2"])]


TASKS: dict[str, Task] = {}


def _add(task: Task) -> None:
    TASKS[task.name] = task


_add(Task(
    "sst2", classes=("0", "1"), reader="tsv", text_fields=("sentence",),
    files={"train": "train.tsv", "test": "dev.tsv"},
    causal=lambda f: f"{f['sentence'].strip()} It was",
    masked=lambda f: f"{f['sentence'].strip()} It was {MASK} .",
    label_words=(" terrible", " great"), masked_label_words=(" terrible", " great")))
_add(Task(
    "rte", classes=("entailment", "not_entailment"), text_fields=("premise", "hypothesis"),
    files={"train": "train.jsonl", "test": "val.jsonl"},
    causal=lambda f: f"{f['premise']}\nDoes this mean that \"{f['hypothesis']}\" is true? "
                     f"Yes or No?\n",
    masked=lambda f: f"{f['premise']} ? {MASK} , {f['hypothesis']}",
    label_words=("Yes", "No"), masked_label_words=(" Yes", " No")))
_add(Task(
    "cb", classes=("entailment", "contradiction", "neutral"), metric="macro_f1",
    text_fields=("premise", "hypothesis"), files={"train": "train.jsonl", "test": "val.jsonl"},
    causal=lambda f: f"Suppose {f['premise']} Can we infer that \"{f['hypothesis']}\"? "
                     f"Yes, No, or Maybe?\n",
    masked=lambda f: f"{f['premise']} ? {MASK} , {f['hypothesis']}",
    label_words=("Yes", "No", "Maybe"), masked_label_words=(" Yes", " No", " Maybe")))
_add(Task(
    "boolq", classes=("false", "true"), text_fields=("passage", "question"),
    files={"test": "val.jsonl"},  # only the validation set ships: train is drawn from it
    causal=lambda f: f"{f['passage']} {f['question']}?",
    masked=lambda f: f"{f['passage']} {f['question']}? {MASK} .",
    label_words=(" No", " Yes"), masked_label_words=(" No", " Yes")))
_add(Task(
    "copa", classes=("0", "1"), text_fields=("premise", "choice1", "choice2", "question"),
    files={"train": "train.jsonl", "test": "val.jsonl"},
    causal=_copa_prompt, candidates=_copa_candidates))
_add(Task(
    "trec", classes=("DESC", "ENTY", "ABBR", "HUM", "LOC", "NUM"), reader="trec",
    text_fields=("question",), files={"train": "train.txt", "test": "test.txt"},
    causal=lambda f: f"{f['question'].strip()} Answer type:",
    masked=lambda f: f"{MASK} : {f['question'].strip()}",
    label_words=(" Description", " Entity", " Abbreviation", " Human", " Location", " Number"),
    masked_label_words=("Description", "Entity", "Expression", "Human", "Location", "Number")))


def custom_task(template: str, label_words: dict[str, str]) -> Task:
    """`--task custom`: records {<fields>, "label": <key of label_words>} in train/valid/test
    .jsonl; `template` uses {field} placeholders and, for masked LMs, {mask}."""
    if not template:
        raise DataError(None, None, "template", "--task custom needs --template, e.g. "
                        "'{text} It was' (causal) or '{text} It was {mask} .' (masked)")
    if not label_words or len(label_words) < 2:
        raise DataError(None, None, "label_words", "--task custom needs --label-words with at "
                        "least two entries, e.g. {negative: ' bad', positive: ' good'}")
    import string
    names = [f for _, f, _, _ in string.Formatter().parse(template) if f and f != "mask"]
    classes = tuple(str(k) for k in label_words)
    words = tuple(label_words[k] for k in label_words)
    has_mask = MASK in template
    return Task(
        "custom", classes=classes, text_fields=tuple(names),
        files={"train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"},
        # a causal LM answers after the text before the mask (or after the whole template)
        causal=lambda f: template.split(MASK)[0].format(**f).rstrip(),
        masked=lambda f: (template if has_mask else template + " " + MASK).format(
            **f, mask=MASK),
        label_words=words, masked_label_words=words)


def get_task(name: str, template: str = "", label_words: dict | None = None) -> Task:
    if name == "custom":
        return custom_task(template, label_words or {})
    if name not in TASKS:
        raise DataError(None, None, "task", f"unknown task {name!r}; available: "
                        f"{', '.join(sorted(TASKS))}, custom")
    return TASKS[name]


# ---- readers -------------------------------------------------------------------------------
def _label_index(task: Task, value, path: Path, line: int) -> int:
    v = str(value).lower() if isinstance(value, bool) else str(value)
    if v not in task.classes:
        raise DataError(path, line, "label", f"{value!r} is not one of {', '.join(task.classes)}")
    return task.classes.index(v)


def _check_fields(task: Task, rec: dict, path: Path, line: int) -> dict[str, str]:
    out = {}
    for f in task.text_fields:
        if f not in rec:
            raise DataError(path, line, f, f"missing (a {task.name} record needs "
                            f"{', '.join(task.text_fields)} and label)")
        if not isinstance(rec[f], str) or not rec[f].strip():
            raise DataError(path, line, f, "must be a non-empty string")
        out[f] = rec[f]
    return out


def _records(task: Task, path: Path) -> Iterator[tuple[int, dict, object]]:
    """(line, record, label value) of each non-blank line, in the task's file format."""
    if task.reader == "jsonl":
        for line, rec in json_lines(path):
            if not isinstance(rec, dict):
                raise DataError(path, line, None, "expected a JSON object")
            if "label" not in rec:
                raise DataError(path, line, "label", "missing")
            yield line, rec, rec["label"]
        return
    lines = [l.rstrip("\r") for l in read_text(path).split("\n")]
    if task.reader == "tsv":
        rows = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None)
        if header is None:
            raise DataError(path, None, None, "empty file")
        cols = {h.strip(): i for i, h in enumerate(header)}
        for f in (*task.text_fields, "label"):
            if f not in cols:
                raise DataError(path, 1, f, f"column missing from the header {header}")
        for line, row in enumerate(rows, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise DataError(path, line, None, f"{len(row)} columns, the header has "
                                f"{len(header)}")
            yield line, {f: row[cols[f]] for f in task.text_fields}, row[cols["label"]].strip()
    else:  # trec: "COARSE:fine question"
        for line, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            head, _, question = text.strip().partition(" ")
            if ":" not in head or not question:
                raise DataError(path, line, None, "expected 'COARSE:fine question'")
            yield line, {"question": question}, head.split(":", 1)[0]


def read_examples(task: Task, path: str | os.PathLike) -> list[Example]:
    """Read one split file of `task`; every record validated, errors name file:line:field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, f"no such file (the {task.name} task expects "
                        f"{', '.join(task.files.values())} in its data folder)")
    out = [Example(_check_fields(task, rec, path, line), _label_index(task, label, path, line),
                   f"{path}:{line}") for line, rec, label in _records(task, path)]
    if not out:
        raise DataError(path, None, None, "no records")
    return out


# ---- few-shot sampling -----------------------------------------------------------------------
SEEDS = (13, 21, 42, 87, 100)  # the seeds of the LM-BFF / MeZO few-shot protocol
EVAL_SEED = 0  # the held-out subset does not depend on the training seed: runs compare


def _by_class(examples: list[Example], n_classes: int) -> list[list[int]]:
    idx: list[list[int]] = [[] for _ in range(n_classes)]
    for i, e in enumerate(examples):
        idx[e.label].append(i)
    return idx


def few_shot(pool: list[Example], n_classes: int, k: int, seed: int
             ) -> tuple[list[Example], list[Example], list[str]]:
    """k examples per class for training and, disjoint from them, k per class for validation,
    drawn with `seed` (deterministic). k <= 0 takes the whole pool for training and no
    validation. Returns (train, valid, warnings) -- a class short of 2k examples is named."""
    if k <= 0:
        return list(pool), [], []
    rng = random.Random(seed)
    train, valid, warnings = [], [], []
    for c, idx in enumerate(_by_class(pool, n_classes)):
        idx = idx[:]
        rng.shuffle(idx)
        if len(idx) < 2 * k:
            warnings.append(f"class {c} has {len(idx)} training examples, fewer than 2k = {2*k}: "
                            f"{min(k, len(idx))} train, {max(0, len(idx) - k)} valid")
        train += idx[:k]
        valid += idx[k:2 * k]
    # interleave classes in a seeded order so a batch is not one class
    rng.shuffle(train)
    rng.shuffle(valid)
    return [pool[i] for i in train], [pool[i] for i in valid], warnings


def subsample(examples: list[Example], n: int, seed: int = EVAL_SEED) -> list[Example]:
    """Up to n examples, a seeded random subset in file order (all of them when n <= 0)."""
    if n <= 0 or len(examples) <= n:
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def task_splits(task: Task, data_dir: str | os.PathLike, k: int, seed: int,
                eval_examples: int = 1000) -> tuple[dict[str, list[Example]], list[str]]:
    """train / valid / test examples of `task` under the few-shot protocol.

    Train (and valid) are k per class from the task's training file; test is its dev set, up to
    `eval_examples` of it. A task that ships only a dev set (BoolQ) holds out `eval_examples`
    of it for test and samples train/valid from the rest, so they never overlap."""
    d = Path(data_dir)
    test_file = d / task.files.get("test", "")
    optional = task.name == "custom" and not test_file.is_file()  # a custom task may have none
    test = read_examples(task, test_file) if "test" in task.files and not optional else []
    if "train" in task.files:
        pool = read_examples(task, d / task.files["train"])
        test = subsample(test, eval_examples)
    else:
        order = list(range(len(test)))
        random.Random(EVAL_SEED).shuffle(order)
        n_test = min(eval_examples if eval_examples > 0 else len(test) // 2, len(test) // 2)
        held = sorted(order[:n_test])
        pool = [test[i] for i in sorted(order[n_test:])]
        test = [test[i] for i in held]
    train, valid, warnings = few_shot(pool, len(task.classes), k, seed)
    if "valid" in task.files and (d / task.files["valid"]).is_file():
        valid = read_examples(task, d / task.files["valid"])  # a custom task's own split
    return {"train": train, "valid": valid, "test": test}, warnings


def default_data_dir(task: str) -> Path:
    """Where a benchmark task's files are looked for when --data is not given:
    $POCKETLLM_DATA/<task>, else ../shared/data/<task> from the working directory."""
    root = os.environ.get("POCKETLLM_DATA")
    return Path(root) / task if root else Path("..") / "shared" / "data" / task


# ---- encoding --------------------------------------------------------------------------------
def label_token_ids(task: Task, tok, masked: bool) -> list[int]:
    """First token of each label word; they must differ, since one position is read."""
    words = task.words(masked)

    def firsts(ws):
        out = []
        for w in ws:
            t = tok(w, add_special_tokens=False)["input_ids"]
            if not t:
                raise DataError(None, None, "label_words", f"label word {w!r} encodes to no tokens")
            out.append(t[0])
        return out
    ids = firsts(words)
    if len(set(ids)) != len(ids):
        # a byte-level tokenizer reads " great" and " terrible" as the same first byte
        ids = firsts([w.lstrip() for w in words])
    if len(set(ids)) != len(ids):
        raise DataError(None, None, "label_words", f"label words {list(words)} start with the "
                        f"same token for this tokenizer; choose words that differ in their "
                        f"first token")
    return ids


def _truncate(ids: list[int], keep: int, limit: int | None) -> list[int]:
    """Cut to `limit` tokens from the start of the text (after the first special token) so the
    end of the prompt, where the template asks its question, survives; position `keep` (the
    mask) must stay inside."""
    if limit is None or len(ids) <= limit:
        return ids
    excess = len(ids) - limit
    if keep - 1 >= excess:
        return ids[:1] + ids[1 + excess:]
    return ids[:limit - 1] + ids[-1:]  # the mask is early: cut the end instead


def encode_examples(examples: list[Example], task: Task, tok, masked: bool,
                    max_seq_length: int | None = None) -> list[tuple]:
    """Items `(ids, n_prompt, meta)` for the batcher: classification items carry the answer
    position, class and label token ids; multiple-choice items one (ids, n_prompt) per
    candidate. No LM loss on any token (n_prompt = len(ids))."""
    items: list[tuple] = []
    if task.multiple_choice:
        if masked:
            raise DataError(None, None, "task", f"{task.name} is multiple choice, scored by the "
                            "likelihood of each candidate: it needs a causal LM")
        for e in examples:
            prompt = task.causal(e.fields)
            p_ids = tok(prompt)["input_ids"]
            cands = []
            for c in task.candidates(e.fields):
                ids = list(tok(prompt + c)["input_ids"])
                n = 0
                while n < min(len(ids), len(p_ids)) and ids[n] == p_ids[n]:
                    n += 1
                n = min(n, len(ids) - 1)  # at least one candidate token is scored
                if max_seq_length and len(ids) > max_seq_length:
                    cut = len(ids) - max_seq_length
                    ids, n = ids[:1] + ids[1 + cut:], max(1, n - cut)
                cands.append((ids, n))
            items.append((cands[0][0], len(cands[0][0]),
                          {"class_label": e.label, "candidates": cands}))
        return items
    label_ids = label_token_ids(task, tok, masked)
    mask_id = getattr(tok, "mask_token_id", None)
    if masked and mask_id is None:
        raise DataError(None, None, "model", "a masked-LM task needs a tokenizer with a mask token")
    for e in examples:
        if masked:
            ids = list(tok(task.masked(e.fields).replace(MASK, tok.mask_token))["input_ids"])
            pos = ids.index(mask_id)
            ids = _truncate(ids, pos, max_seq_length)
            if mask_id not in ids:
                raise DataError(e.where, None, None, "the mask token was cut by --max-seq-length")
            pos = ids.index(mask_id)
        else:
            ids = list(tok(task.causal(e.fields))["input_ids"])
            ids = _truncate(ids, len(ids) - 1, max_seq_length)
            pos = len(ids) - 1  # the last prompt token predicts the label word
        items.append((ids, len(ids), {"class_label": e.label, "label_ids": label_ids,
                                      "answer_pos": pos}))
    return items
