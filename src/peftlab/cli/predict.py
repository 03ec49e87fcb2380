"""peftlab predict RUN_DIR --text "..." [--text ...] | --input FILE [--output FILE]"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from peftlab.cli._checks import PRECISIONS, output_file, positive_int
from peftlab.errors import UserError
from peftlab.files import clean_stale, replacing, write_text


# out of memory: what to lower (cli/__init__.py prints it in one line)
MEMORY_HINT = "lower --batch-size (texts per forward pass, default 64)"


def add_parser(sub):
    p = sub.add_parser("predict", help="label texts with a trained run")
    p.add_argument("run_dir", help="a completed run directory (peftlab train --output-dir)")
    p.add_argument("--text", action="append", default=[], help="a text to classify (repeatable)")
    p.add_argument("--input", help="CSV, TSV, JSON Lines or Parquet file with a text column (or the run's text columns)")
    p.add_argument("--output", help="write here (CSV when it ends in .csv, else JSON Lines); default stdout")
    p.add_argument("--batch-size", type=positive_int, default=64, help="texts per forward pass (default 64)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 where the device multiplies bf16 in hardware (a bf16 GPU; a CPU with AVX512-BF16 or "
                        "AMX), else fp32 (default: %(default)s)")
    p.add_argument("--csv-safe", action=argparse.BooleanOptionalAction, default=True,
                   help="CSV output: a text or label cell that starts with = + - @ (or a tab or carriage return) gets "
                        "a leading ' so spreadsheets show it instead of running it as a formula (CSV injection); "
                        "--no-csv-safe writes cells exactly, for programs (default: on; JSON Lines is never changed)")
    return p


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what spreadsheets read as a formula (OWASP CSV injection)


def spreadsheet_safe(cell):
    """A text cell a spreadsheet shows as text: ' before a formula start (the common mitigation;
    spreadsheets hide the quote). Numbers are left as they are."""
    return "'" + cell if isinstance(cell, str) and cell.startswith(FORMULA_STARTS) else cell


def write_rows(path: str | None, texts: list[str], rows: list[dict], names: list[str], separator: str = "|",
               csv_safe: bool = True) -> None:
    """JSON Lines (stdout when no path), or CSV when the path ends in .csv: text, then every field of the
    rows but the probabilities (single-label: label, confidence; multi-label: labels, the set joined by
    `separator`, empty for none), then prob_<name> per label; with csv_safe, text cells are made
    spreadsheet-safe (spreadsheet_safe)."""
    if path:
        clean_stale(Path(path).parent, Path(path).name)  # what a killed earlier predict left
    if path and path.endswith(".csv"):
        import pandas as pd

        fields = [f for f in (rows[0] if rows else []) if f != "probabilities"]
        frame = pd.DataFrame({"text": texts})
        for field in fields:
            frame[field] = [separator.join(r[field]) if isinstance(r[field], list) else r[field] for r in rows]
        for name in names:
            frame[f"prob_{name}"] = [r["probabilities"][name] for r in rows]
        if csv_safe:
            frame = frame.map(spreadsheet_safe)  # text and label(s); headers start with letters
        with replacing(path) as tmp:  # never a truncated out.csv that looks complete
            # CRLF rows (RFC 4180): then a text holding a bare \r is quoted too (with \n rows it is not,
            # and a reader would split the row there)
            frame.to_csv(tmp, index=False, lineterminator="\r\n")
        return
    lines = "".join(json.dumps({"text": t, **r}) + "\n" for t, r in zip(texts, rows))
    if path:
        write_text(path, lines)
    else:
        sys.stdout.write(lines)


def run(args) -> int:
    from peftlab.data.tokenize import valid_text  # (torch: imported when the command runs)
    from peftlab.runs.rundir import RunDir

    from peftlab.data.sources import read_texts
    from peftlab.runs.trained import load_predictor

    if not args.text and not args.input:
        raise UserError("nothing to predict: pass --text \"...\" (repeatable) or --input FILE")
    if args.output:
        output_file(args.output, "--output")
    predictor = load_predictor(args.run_dir, batch_size=args.batch_size, precision=args.precision)
    data = RunDir(args.run_dir).config().data
    # undecodable command-line bytes become U+FFFD, here and in every output format
    texts = [valid_text(t) for t in args.text] + (read_texts(args.input, data.text_columns, "--input") if args.input else [])
    rows = predictor.predict(texts, progress=len(texts) > 1000)
    write_rows(args.output, texts, rows, predictor.label_names, data.label_separator, args.csv_safe)
    if args.output:
        print(f"{len(rows)} predictions written to {args.output}", file=sys.stderr)
    return 0
