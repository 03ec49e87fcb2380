"""A real multi-label text dataset, offline: Debian package summaries and their debtags.

Debian's package lists (the `Packages` index apt downloads, on any Debian or Ubuntu machine) give each
package a one-line summary written by its maintainer, and most packages carry debtags: facets such as
`use::editing` or `works-with::audio`, assigned by people. A package may have several. This script keeps
the twelve most common tags of the `use::` and `works-with::` facets (what a program is for, what it
works with), and every package that has at least one of them, as JSON Lines rows
`{"text": "<package>: <summary>", "labels": [...], "package": ...}`; summaries that occur twice (foo and
foo-data) are kept once, so no text leaks across the splits peftlab carves.

    python examples/debtags.py data/debtags.jsonl               # every row (about 4,600 on bookworm)
    python examples/debtags.py tests/data/debtags_sample.jsonl --sample 360
    peftlab train configs/debtags-multilabel.yaml

The index is read where apt keeps it (/var/lib/apt/lists, any compression apt reads) or from --packages.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

# the twelve most frequent use:: and works-with:: tags of Debian bookworm main (amd64), fixed here so that
# the label set does not move with the archive
LABELS = ["works-with::text", "use::gameplaying", "use::converting", "works-with::audio", "use::editing",
          "use::checking", "use::viewing", "works-with::image", "use::monitor", "works-with::mail",
          "works-with::file", "use::configuring"]


def find_index() -> Path:
    lists = sorted(Path("/var/lib/apt/lists").glob("*_main_binary-amd64_Packages*"))
    if not lists:
        sys.exit("debtags.py: no Debian main Packages index under /var/lib/apt/lists; run `apt-get update` "
                 "(as root) or pass --packages FILE")
    return lists[0]


def read_index(path: Path) -> str:
    """The index as text, decompressed by apt's own helper (lz4, xz, gz) when it is compressed."""
    if path.suffix in (".lz4", ".xz", ".gz", ".bz2", ".zst"):
        out = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", str(path)], capture_output=True, check=True)
        return out.stdout.decode("utf-8", "replace")
    return path.read_text(encoding="utf-8", errors="replace")


def stanzas(text: str):
    """Each package's fields (continuation lines joined)."""
    for block in text.split("\n\n"):
        fields, key = {}, None
        for line in block.split("\n"):
            if line.startswith((" ", "\t")) and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            yield fields


def rows_from(text: str) -> list[dict]:
    rows, seen = [], set()
    for fields in stanzas(text):
        tags = {t.strip() for t in fields.get("Tag", "").split(",")}
        labels = [label for label in LABELS if label in tags]
        summary = fields.get("Description", "").strip()
        if not labels or not summary or summary.lower() in seen:
            continue
        seen.add(summary.lower())
        rows.append({"text": f"{fields['Package']}: {summary}", "labels": labels, "package": fields["Package"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="JSON Lines file to write")
    parser.add_argument("--packages", type=Path, help="a Packages index (default: apt's, for main amd64)")
    parser.add_argument("--sample", type=int, help="keep this many rows, drawn at random (seed 0)")
    args = parser.parse_args(argv)
    index = args.packages or find_index()
    rows = rows_from(read_index(index))
    if args.sample:
        rows = sorted(random.Random(0).sample(rows, min(args.sample, len(rows))), key=lambda r: r["package"])
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    digest = hashlib.sha256(index.read_bytes()).hexdigest()[:16]
    print(f"{out}: {len(rows):,} packages, {len(LABELS)} labels, from {index} (sha256 {digest}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
