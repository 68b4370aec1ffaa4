"""Tasks: readers, templates and verbalizers, the few-shot sampler, encoding and collation."""

import json
from collections import Counter

import pytest
import torch

from pocketllm.data import DataError
from pocketllm.data.tasks import (MASK, TASKS, Example, custom_task, encode_examples, few_shot,
                                  get_task, read_examples, subsample, task_splits)
from pocketllm.models import load_model
from pocketllm.objectives import choose

RECORDS = {
    "sst2": {"sentence": "a charming and often affecting journey . ", "label": "1"},
    "rte": {"premise": "No weapons were found.", "hypothesis": "Weapons were found.",
            "label": "not_entailment"},
    "cb": {"premise": "It rained.", "hypothesis": "The ground is wet.", "label": "neutral"},
    "boolq": {"passage": "Ethanol -- a fuel.", "question": "is ethanol a fuel", "label": True},
    "copa": {"premise": "The man turned on the faucet.", "choice1": "The toilet filled.",
             "choice2": "Water flowed from the spout.", "question": "effect", "label": 1},
    "trec": {"question": "How did serfdom develop in Russia ?", "label": "DESC"},
}
# (causal prompt, answer: label word or right candidate) for each record above
EXPECTED = {
    "sst2": ("a charming and often affecting journey . It was", " great"),
    "rte": ('No weapons were found.\nDoes this mean that "Weapons were found." is true? '
            'Yes or No?\n', "No"),
    "cb": ('Suppose It rained. Can we infer that "The ground is wet."? Yes, No, or Maybe?\n',
           "Maybe"),
    "boolq": ("Ethanol -- a fuel. is ethanol a fuel?", " Yes"),
    "copa": ("The man turned on the faucet so", " water flowed from the spout."),
    "trec": ("How did serfdom develop in Russia ? Answer type:", " Description"),
}


def write_task(d, name, records):
    """Files in the task's own format (SST-2 TSV, TREC text, SuperGLUE jsonl)."""
    task = TASKS[name]
    d.mkdir(parents=True, exist_ok=True)
    for split, fname in task.files.items():
        p = d / fname
        if task.reader == "tsv":
            p.write_text("sentence\tlabel\n" + "".join(f"{r['sentence']}\t{r['label']}\n"
                                                       for r in records))
        elif task.reader == "trec":
            p.write_text("".join(f"{r['label']}:manner {r['question']}\n" for r in records))
        else:
            p.write_text("".join(json.dumps(r) + "\n" for r in records))
    return d


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_template_and_verbalizer_on_a_record(tmp_path, name):
    task = TASKS[name]
    ex = read_examples(task, write_task(tmp_path, name, [RECORDS[name]]) /
                       task.files["test"])[0]
    prompt, answer = EXPECTED[name]
    assert task.causal(ex.fields) == prompt
    if task.multiple_choice:
        assert task.candidates(ex.fields)[ex.label] == answer
    else:
        assert task.label_words[ex.label] == answer
        assert MASK in task.masked(ex.fields)


def test_bad_records_name_file_line_field(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text(json.dumps(RECORDS["rte"]) + "\n" + json.dumps({"premise": "x", "label":
                                                                   "entailment"}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: field 'hypothesis'"):
        read_examples(TASKS["rte"], p)
    p.write_text(json.dumps({**RECORDS["rte"], "label": "maybe"}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:1: field 'label': 'maybe' is not one of"):
        read_examples(TASKS["rte"], p)
    t = tmp_path / "train.tsv"
    t.write_text("sentence\tlabel\nfine film\t1\nbad\n")
    with pytest.raises(DataError, match=r"train.tsv:3: 1 columns"):
        read_examples(TASKS["sst2"], t)
    with pytest.raises(DataError, match="unknown task 'sst3'"):
        get_task("sst3")


def pool(n_per_class=(40, 25, 10)):
    return [Example({"t": f"{c}-{i}"}, c) for c, n in enumerate(n_per_class) for i in range(n)]


def test_few_shot_sampler_is_balanced_disjoint_and_deterministic():
    p = pool()
    train, valid, warnings = few_shot(p, 3, k=4, seed=42)
    assert Counter(e.label for e in train) == {0: 4, 1: 4, 2: 4}
    assert Counter(e.label for e in valid) == {0: 4, 1: 4, 2: 4}
    assert not {id(e) for e in train} & {id(e) for e in valid}
    again, _, _ = few_shot(p, 3, k=4, seed=42)
    assert [e.fields for e in again] == [e.fields for e in train]
    other, _, _ = few_shot(p, 3, k=4, seed=13)
    assert [e.fields for e in other] != [e.fields for e in train]
    assert not warnings
    # a class short of 2k examples is named, and valid gets what is left
    _, valid, warnings = few_shot(p, 3, k=8, seed=42)
    assert Counter(e.label for e in valid)[2] == 2 and "class 2 has 10" in warnings[0]
    assert len(few_shot(p, 3, k=0, seed=1)[0]) == len(p)  # k=0: everything
    assert subsample(p, 10) == subsample(p, 10) and len(subsample(p, 10)) == 10


def test_dev_only_task_holds_out_test_disjoint_from_train(tmp_path):
    recs = [{"passage": f"p{i}", "question": f"q{i}", "label": bool(i % 2)} for i in range(60)]
    d = write_task(tmp_path / "boolq", "boolq", recs)
    sp, _ = task_splits(TASKS["boolq"], d, k=4, seed=42, eval_examples=20)
    assert len(sp["test"]) == 20 and len(sp["train"]) == 8 and len(sp["valid"]) == 8
    test_q = {e.fields["question"] for e in sp["test"]}
    assert not test_q & {e.fields["question"] for e in sp["train"] + sp["valid"]}


def test_custom_task_template_and_label_words(tmp_path):
    task = custom_task("Review: {text} Verdict:", {"neg": " bad", "pos": " good"})
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "loved it", "label": "pos"}) + "\n")
    ex = read_examples(task, tmp_path / "train.jsonl")[0]
    assert task.causal(ex.fields) == "Review: loved it Verdict:" and ex.label == 1
    assert task.masked(ex.fields) == "Review: loved it Verdict: {mask}"
    with pytest.raises(DataError, match="--template"):
        custom_task("", {"a": "x", "b": "y"})


def test_encode_and_collate_classification_and_choice():
    _, tok = load_model("tiny-llama", "float32")
    sst = TASKS["sst2"]
    exs = [Example({"sentence": "good fun"}, 1), Example({"sentence": "a long dull mess"}, 0)]
    items = encode_examples(exs, sst, tok, masked=False, max_seq_length=64)
    b = choose(items).collate(items, tok.pad_token_id)
    assert b["class_label"].tolist() == [1, 0] and b["label_ids"].shape == (2, 2)
    # the answer position is the last prompt token of each row
    assert b["answer_pos"].tolist() == [len(items[0][0]) - 1, len(items[1][0]) - 1]
    assert (b["labels"] == -100).all()  # no LM loss on a classification batch
    # truncation keeps the end of the prompt (the template), not its beginning
    short = encode_examples(exs[1:], sst, tok, masked=False, max_seq_length=8)[0][0]
    assert len(short) == 8 and short[-3:] == items[1][0][-3:]
    copa = TASKS["copa"]
    ex = Example(RECORDS["copa"] | {}, 1)
    ex.fields = {k: v for k, v in RECORDS["copa"].items() if k in copa.text_fields}
    items = encode_examples([ex, ex], copa, tok, masked=False)
    b = choose(items).collate(items, tok.pad_token_id)
    assert b["input_ids"].shape[0] == 4 and b["choice_label"].tolist() == [0, 1, 0, 1]
    assert ((b["labels"] != -100).sum(1) > 0).all()  # every candidate has tokens scored
    with pytest.raises(DataError, match="causal LM"):
        encode_examples([ex], copa, tok, masked=True)
