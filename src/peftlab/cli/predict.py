"""peftlab predict RUN_DIR --text "..." [--text ...] | --input FILE [--output FILE]"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from peftlab.errors import UserError


def add_parser(sub):
    p = sub.add_parser("predict", help="label texts with a trained run")
    p.add_argument("run_dir")
    p.add_argument("--text", action="append", default=[], help="a text to classify (repeatable)")
    p.add_argument("--input", help="CSV, TSV, JSON Lines or Parquet file with a text column (or the run's text columns)")
    p.add_argument("--output", help="write here (CSV when it ends in .csv, else JSON Lines); default stdout")
    p.add_argument("--batch-size", type=int, default=64)
    return p


def read_texts(path: str, text_columns: list[str]) -> list[str]:
    from peftlab.data.sources import read_table

    frame = read_table(Path(path))
    columns = ["text"] if "text" in frame.columns else text_columns
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UserError(f"--input {path!r}: no column {missing[0]!r} (columns: {', '.join(map(str, frame.columns))}); "
                        f"name the text column 'text' or {' + '.join(text_columns)}")
    return frame[columns].fillna("").astype(str).agg(" ".join, axis=1).tolist()


def predict_texts(trained, texts: list[str], device, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    from peftlab.data.tokenize import encode
    from peftlab.evaluation.predict import predict_logits, softmax

    data = encode(trained.tokenizer, texts, np.zeros(len(texts), np.int64), trained.config.data.max_length,
                  trained.config.data.cache_dir)
    logits = predict_logits(trained.model, data, trained.tokenizer.pad_token_id, device,
                            batch_size=batch_size, progress=progress)
    return softmax(logits)


def rows(texts: list[str], probs: np.ndarray, names: list[str]) -> list[dict]:
    return [{"text": t, "label": names[int(p.argmax())], "confidence": float(p.max()),
             "probabilities": {n: float(v) for n, v in zip(names, p)}} for t, p in zip(texts, probs)]


def run(args) -> int:
    import torch

    from peftlab.runs.trained import load_trained

    if not args.text and not args.input:
        raise UserError("nothing to predict: pass --text \"...\" (repeatable) or --input FILE")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trained = load_trained(args.run_dir, device)
    texts = list(args.text) + (read_texts(args.input, trained.config.data.text_columns) if args.input else [])
    probs = predict_texts(trained, texts, device, args.batch_size, progress=len(texts) > 1000)
    out = rows(texts, probs, trained.label_names)
    if args.output and args.output.endswith(".csv"):
        import pandas as pd

        frame = pd.DataFrame({"text": texts, "label": [r["label"] for r in out],
                              "confidence": [r["confidence"] for r in out]})
        for j, name in enumerate(trained.label_names):
            frame[f"prob_{name}"] = probs[:, j]
        frame.to_csv(args.output, index=False)
    else:
        lines = "".join(json.dumps(r) + "\n" for r in out)
        if args.output:
            Path(args.output).write_text(lines, encoding="utf-8")
        else:
            sys.stdout.write(lines)
    if args.output:
        print(f"{len(out)} predictions written to {args.output}", file=sys.stderr)
    return 0
