"""`peftlab report`: compare finished runs in one self-contained HTML page plus a Markdown summary."""
from __future__ import annotations

from pathlib import Path

from peftlab.errors import UserError


def build_report(paths: list[Path], output_html: Path) -> tuple[Path, Path]:
    """Collect the runs at or below `paths` and write `output_html` and the same-stem .md beside it.

    Raises UserError for a missing path or when no completed run is found.
    """
    # Imported here so that `import peftlab.reports` stays cheap for the CLI's start-up.
    from peftlab.reports.charts import all_charts
    from peftlab.reports.collect import collect
    from peftlab.reports.render import render_html, render_markdown

    output_html = Path(output_html)
    if output_html.suffix.lower() == ".md":
        raise UserError(f"report: --output {output_html} must be an .html file (the .md is written beside it)")
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("report: give at least one run or sweep directory")
    report = collect(paths)
    output_md = output_html.with_suffix(".md")
    from peftlab.files import clean_stale, translated, write_text

    with translated(output_html.parent):
        output_html.parent.mkdir(parents=True, exist_ok=True)
    for out in (output_html, output_md):
        clean_stale(out.parent, out.name)  # what a killed earlier report left
    write_text(output_html, render_html(report, [all_charts(sec) for sec in report.sections], paths))
    write_text(output_md, render_markdown(report))
    return output_html, output_md


__all__ = ["build_report"]
