"""One SetFit cell of examples/few_shot_study.py, run with SetFit's own virtualenv (never peftlab's):
train on DATA/train.jsonl, score DATA/test.jsonl, write accuracy, macro-F1, train seconds and the number
of pairs as JSON. SetFit's own defaults unless --iterations / --max-length are given: its pair sampling
(sampling_strategy "oversampling": every pair of the smaller kind, positive or negative, and as many of
the other, drawn), the checkpoint's max_seq_length, CosineSimilarityLoss, 1 epoch of batch 16 over the
pairs, body learning rate 2e-5, logistic regression head."""
import argparse
import json
import os
import time

from datasets import Dataset
from setfit import SetFitModel, Trainer, TrainingArguments
from sklearn.metrics import accuracy_score, f1_score


def rows(path: str) -> Dataset:
    with open(path, encoding="utf-8") as f:
        data = [json.loads(line) for line in f]
    return Dataset.from_dict({"text": [r["text"] for r in data], "label": [r["label"] for r in data]})


def pairs_of(trainer, train, targs) -> int:
    """The pairs SetFit trains on, counted by its own sampler."""
    from setfit.sampler import ContrastiveDataset

    data = ContrastiveDataset(train["text"], train["label"], False, num_iterations=targs.num_iterations,
                              sampling_strategy=targs.sampling_strategy)
    return len(data)


def main() -> None:
    p = argparse.ArgumentParser()
    for a in ("--model", "--data", "--output"):
        p.add_argument(a, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=None, help="num_iterations (default: SetFit's sampling)")
    p.add_argument("--max-length", type=int, default=None, help="default: the checkpoint's max_seq_length")
    args = p.parse_args()
    train, test = rows(os.path.join(args.data, "train.jsonl")), rows(os.path.join(args.data, "test.jsonl"))
    names = sorted(set(train["label"]))
    model = SetFitModel.from_pretrained(args.model, labels=names)
    given = {k: v for k, v in (("num_iterations", args.iterations), ("max_length", args.max_length)) if v is not None}
    targs = TrainingArguments(batch_size=16, num_epochs=1, seed=args.seed, show_progress_bar=False, report_to="none",
                              save_strategy="no", output_dir=os.path.join(os.path.dirname(args.output), "setfit-tmp"),
                              **given)
    trainer = Trainer(model=model, args=targs, train_dataset=train)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    predicted = list(model.predict(test["text"], batch_size=64))
    truth = test["label"]
    out = {"accuracy": accuracy_score(truth, predicted), "macro_f1": f1_score(truth, predicted, average="macro"),
           "train_seconds": round(seconds, 3), "pairs": pairs_of(trainer, train, targs),
           "max_length": model.model_body.max_seq_length, "settings": given or "setfit defaults"}
    with open(args.output + ".tmp", "w", encoding="utf-8") as f:
        json.dump(out, f)
    os.replace(args.output + ".tmp", args.output)


if __name__ == "__main__":
    main()
