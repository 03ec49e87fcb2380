"""peftlab report DIR... [--output report.html]"""
from __future__ import annotations

from pathlib import Path

from peftlab.cli._checks import output_file


def add_parser(sub):
    p = sub.add_parser("report", help="compare run and sweep directories in one HTML page (+ Markdown)",
                       description="Collect every run at or below the given directories (run directories, sweep "
                                   "directories) and write a self-contained HTML report and a Markdown copy beside it.")
    p.add_argument("paths", nargs="+", metavar="DIR", help="run or sweep directories")
    p.add_argument("--output", "-o", help="HTML file to write (default: DIR/report.html for one directory, "
                                          "else report.html); the .md goes beside it")
    return p


def run(args) -> int:
    from peftlab.reports import build_report

    paths = [Path(p) for p in args.paths]
    if args.output:
        output = Path(args.output)
    elif len(paths) == 1 and paths[0].is_dir():
        output = paths[0] / "report.html"
    else:
        output = Path("report.html")
    output_file(output, "--output", make_parent=True)
    html_path, md_path = build_report(paths, output)
    print(f"report: {html_path}")
    print(f"markdown: {md_path}")
    return 0
