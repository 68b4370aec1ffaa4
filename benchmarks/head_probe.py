"""How far the frozen default model's last hidden state separates a records dataset's labels:
the ceiling of `--trainable head` (offsets to the label words' rows of the output head).

Reads the final hidden state at each prompt's last token (the position that predicts the
completion's first token) for train / valid / test, then scores (a) the zero-shot label rows
(the right label's row scores highest among the labels) and (b) a logistic regression over the
labels, fitted by L-BFGS on train, its rows started at the head's and decayed toward them by
`wd`. First-order and exact: what a zeroth-order run of the same set can at best approach.

    python benchmarks/head_probe.py [--data examples/personal] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform

from _run import ROOT, write_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="examples/personal")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="head_probe.md")
    a = ap.parse_args()
    import torch
    import torch.nn.functional as F

    from pocketllm.loss import backbone, output_head
    from pocketllm.models import load_model
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    data = ROOT / a.data
    splits = {s: [json.loads(line) for line in (data / f"{s}.jsonl").read_text().splitlines()
                  if line.strip()] for s in ("train", "valid", "test")}
    labels = sorted({r["completion"] for r in splits["train"]})
    label_ids = [tok(lab, add_special_tokens=False).input_ids[0] for lab in labels]
    X, Y = {}, {}
    with torch.no_grad():
        for s, recs in splits.items():
            hs = []
            for r in recs:
                ids = torch.tensor([tok(r["prompt"]).input_ids])
                hs.append(backbone(model, {"input_ids": ids,
                                           "attention_mask": torch.ones_like(ids)})[0, -1])
            X[s], Y[s] = torch.stack(hs), torch.tensor([labels.index(r["completion"])
                                                        for r in recs])
    W = output_head(model).weight.detach()[label_ids].float()

    def acc(Wp, s) -> str:
        return f"{100 * ((X[s] @ Wp.T).argmax(1) == Y[s]).float().mean():.1f}"

    rows = [["zero-shot label rows", "-", acc(W, "train"), acc(W, "valid"), acc(W, "test"), "0"]]
    for wd in (1e-3, 1e-2, 1e-1):
        Wp = W.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([Wp], max_iter=300)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(X["train"] @ Wp.T, Y["train"]) + wd * ((Wp - W) ** 2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        Wp = Wp.detach()
        rows.append(["logistic regression on the rows", wd, acc(Wp, "train"), acc(Wp, "valid"),
                     acc(Wp, "test"), f"{(Wp - W).norm():.2f}"])
    write_table(a.out, f"Linear-probe ceiling of --trainable head: {a.model} on {a.data}",
                f"python benchmarks/head_probe.py --data {a.data} --threads {a.threads}",
                f"{platform.processor() or platform.machine()}, {a.threads} threads",
                ["scorer", "wd", "train %", "valid %", "test %", "|offset|"], rows,
                notes=f"{len(labels)} labels ({', '.join(repr(x) for x in labels)}); "
                      f"{', '.join(f'{s} {len(v)}' for s, v in splits.items())} records. "
                      "Accuracy = the right label's row scores highest among the labels' "
                      "rows at the prompt's last position (no bias: the head has none).")


if __name__ == "__main__":
    main()
