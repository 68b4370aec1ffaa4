"""What computing only the label words' logits saves: a classification forward of the default
model on SST-2-shaped prompts, scored (a) the plain way, full-vocabulary logits at every
position then a gather, and (b) pocketllm's way, the hidden state at the answer position times
the label rows of the head. Each in a fresh process: time per forward and peak RSS.

    python benchmarks/label_logits.py [--batch-size 16 --seq 64 --rounds 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _run import ROOT, write_table


def child(mode: str, batch: int, seq: int, rounds: int, dtype: str) -> dict:
    import torch

    from pocketllm import memory
    from pocketllm.objectives import Classification
    class_stats = Classification().stats
    memory.tune_allocator()
    from pocketllm.models import load_model
    model, tok = load_model("smollm2-135m", dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    label_ids = torch.tensor(tok([" terrible", " great"], add_special_tokens=False)["input_ids"])[:, 0]
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
         "labels": torch.full_like(ids, -100), "class_label": torch.arange(batch) % 2,
         "answer_pos": torch.full((batch,), seq - 1), "label_ids": label_ids.expand(batch, 2)}

    def full():
        logits = model(input_ids=ids, attention_mask=b["attention_mask"]).logits
        lg = logits[torch.arange(batch), b["answer_pos"]].gather(1, b["label_ids"]).float()
        return torch.nn.functional.cross_entropy(lg, b["class_label"])

    def ours():
        return class_stats(model, b).nll.mean()

    fn = full if mode == "full" else ours
    with torch.no_grad():
        fn()  # warm-up
        memory.reset_peak()
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            loss = fn()
            times.append(time.perf_counter() - t0)
    return {"mode": mode, "loss": float(loss), "seconds": sorted(times)[len(times) // 2],
            "peak_rss_mb": memory.peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.batch_size, a.seq, a.rounds, a.dtype)))
        return
    from pocketllm.bench.machine import describe
    res = {}
    for mode in ("full", "ours"):
        cmd = [sys.executable, __file__, "--child", mode, "--batch-size", str(a.batch_size),
               "--seq", str(a.seq), "--rounds", str(a.rounds), "--dtype", a.dtype]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    f, o = res["full"], res["ours"]
    rows = [["full-vocabulary logits, then gather", f"{f['seconds']:.3f}", f"{f['peak_rss_mb']:.0f}",
             f"{f['loss']:.5f}"],
            ["label rows at the answer position (pocketllm)", f"{o['seconds']:.3f}",
             f"{o['peak_rss_mb']:.0f}", f"{o['loss']:.5f}"]]
    notes = (f"Batch {a.batch_size} x {a.seq} tokens, {a.dtype}, median of {a.rounds} forwards "
             f"after a warm-up, each mode in a fresh process. Saving: "
             f"{f['seconds'] - o['seconds']:.3f} s per forward "
             f"({(1 - o['seconds'] / f['seconds']) * 100:.0f}%) and "
             f"{f['peak_rss_mb'] - o['peak_rss_mb']:.0f} MB of peak RSS; the logits tensor alone "
             f"would be {a.batch_size * a.seq * 49152 * 4 / 2**20:.0f} MB in float32. "
             f"Same loss in both (the test suite checks equality on tiny models).")
    write_table("label_logits.md", "Classification forward: only the label words' logits",
                " ".join(["python benchmarks/label_logits.py", "--batch-size", str(a.batch_size),
                          "--seq", str(a.seq), "--rounds", str(a.rounds), "--dtype", a.dtype]),
                describe(), ["scoring", "s / forward", "peak RSS MB", "loss"], rows, notes)


if __name__ == "__main__":
    main()
