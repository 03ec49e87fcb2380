"""The 1,800 AG News offline training texts that configs/study-distill-unlabeled.yaml gives its teacher to
label: the stratified 2,400-row train subset of data.seed 42 minus the 600-row one the student has labels
for (the subsets of one seed are nested), without their labels.

    python examples/agnews_unlabeled.py data/agnews-offline-unlabeled-1800.jsonl
"""
import json
import sys

from peftlab.config import load_config
from peftlab.data import load_data

BASE = ["data.path=../shared/data/ag_news/test.jsonl.gz", "data.test_fraction=0.2105263",
        "data.validation_fraction=0.1666666", "data.max_eval_samples=400", "data.seed=42"]


def main(out: str) -> None:
    labelled = set(load_data(load_config(None, BASE + ["data.max_train_samples=600"]).data, 1).train.texts)
    pool = load_data(load_config(None, BASE + ["data.max_train_samples=2400"]).data, 1).train.texts
    extra = [t for t in pool if t not in labelled]
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in extra)
    print(f"{out}: {len(extra):,} texts (of {len(pool):,}; {len(labelled):,} are the student's labelled rows)")


if __name__ == "__main__":
    main(sys.argv[1])
