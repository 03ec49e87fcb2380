import html
import json
import re
import shutil
import statistics
import subprocess
from itertools import dropwhile, takewhile
from pathlib import Path

import matplotlib.image
import pytest

from conftest_report_helpers import make_run, make_study
from peftlab.errors import UserError
from peftlab.reports import build_report
from peftlab.reports.collect import collect
from peftlab.runs.plots import write_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One fabricated study and its report, shared (read-only) by the tests below."""
    tmp_path = tmp_path_factory.mktemp("study")
    runs = make_study(tmp_path / "runs")
    html_path, md_path = build_report([tmp_path / "runs" / "sweep", tmp_path / "runs" / "single"],
                                      tmp_path / "out" / "report.html")
    return runs, html_path, md_path


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _md_table(md: str, heading: str) -> list[dict[str, str]]:
    """The Markdown table under `heading`, as one dict per row."""
    lines = md.split(heading, 1)[1].strip().splitlines()
    is_row = lambda line: line.startswith("|")  # noqa: E731
    rows = list(takewhile(is_row, dropwhile(lambda line: not is_row(line), lines)))
    # cells as a viewer shows them: Markdown escapes and entities undone
    split = lambda line: [html.unescape(re.sub(r"\\(.)", r"\1", c.strip())) for c in line.strip("|").split(" | ")]  # noqa: E731
    head = split(rows[0])
    return [dict(zip(head, split(r))) for r in rows[2:]]


# ---------------------------------------------------------------- plots of one run

def test_write_plots_makes_valid_pngs(tmp_path):
    run = make_run(tmp_path, "r1")
    paths = write_plots(run)
    assert [p.name for p in paths] == ["loss.png", "validation.png", "confusion_matrix.png", "confidence.png",
                                       "reliability.png"]
    for p in paths:
        assert p.parent == run / "plots" and p.read_bytes()[:8] == PNG_MAGIC
        h, w = matplotlib.image.imread(p).shape[:2]
        assert h > 100 and w > 100


def test_write_plots_skips_what_is_missing(tmp_path):
    run = make_run(tmp_path, "r1")
    (run / "history.jsonl").unlink()
    (run / "predictions.csv").unlink()
    assert [p.name for p in write_plots(run)] == ["confusion_matrix.png"]
    (tmp_path / "empty").mkdir()
    assert write_plots(tmp_path / "empty") == []


def test_write_plots_tolerates_torn_history(tmp_path):
    run = make_run(tmp_path, "r1")
    with open(run / "history.jsonl", "a") as f:
        f.write('{"kind": "step", "st')  # killed mid-write
    assert (run / "plots" / "loss.png") in write_plots(run)


# ---------------------------------------------------------------- collecting and grouping

def test_groups_seeds_and_lists_failures(tmp_path):
    make_study(tmp_path)
    report = collect([tmp_path])
    assert sorted(g.name for g in report.sections[0].groups) == ["full", "ia3", "lora-r16", "lora-r8-s1 ×3 seeds"]
    group = next(g for g in report.sections[0].groups if g.n == 3)
    assert [r.name for r in group.runs] == ["lora-r8-s1", "lora-r8-s2", "lora-r8-s3"]
    assert {(r.name, r.status) for r in report.not_completed} == {
        ("broken", "failed"), ("unfinished", "incomplete (no metrics.json)")}


def test_mean_and_std_over_seeds(tmp_path):
    runs = make_study(tmp_path)
    group = next(g for g in collect([tmp_path]).sections[0].groups if g.n == 3)
    accs = [_metrics(runs[f"lora-r8-s{s}"])["test"]["accuracy"] for s in (1, 2, 3)]
    assert accs == [0.90, 0.88, 0.92]
    mean, std = group.stat("test", "accuracy")
    assert mean == pytest.approx(0.90) and std == pytest.approx(0.02)  # sample std (n - 1)
    assert group.stat("validation", "macro_f1") == pytest.approx((0.92, 0.02))
    single = next(g for g in collect([tmp_path]).sections[0].groups if g.name == "full")
    assert single.stat("test", "accuracy") == (0.95, None)  # no std for one seed


def test_pareto_membership(tmp_path):
    make_study(tmp_path)
    front = {g.name for g in collect([tmp_path]).sections[0].groups if g.on_pareto}
    # lora-r16 has more parameters and lower accuracy than the lora-r8 group: dominated.
    assert front == {"ia3", "lora-r8-s1 ×3 seeds", "full"}


def test_best_is_chosen_by_validation_not_test(study):
    runs, html_path, md_path = study
    report = collect([runs["full"].parent.parent]).sections[0]
    best_by_test = max(report.groups, key=lambda g: g.mean("test", "accuracy"))
    assert best_by_test.name == "full"
    assert report.metric == "macro_f1" and report.best.name == "lora-r16" and report.best_run.name == "lora-r16"
    md = md_path.read_text()
    assert "Best by validation macro-F1: lora-r16 (validation macro-F1 0.9500). Its test accuracy is 0.8500" in md
    assert "(lora-r16)" in html.unescape(html_path.read_text())  # the confusion matrix caption


def test_best_run_within_a_seed_group(tmp_path):
    for seed, vf1 in [(1, 0.90), (2, 0.97), (3, 0.93)]:
        make_run(tmp_path, f"s{seed}", seed=seed, val_f1=vf1)
    make_run(tmp_path, "other", r=4, val_f1=0.94)
    report = collect([tmp_path]).sections[0]
    assert report.best.name == "other"  # 0.94 beats the group's mean 0.9333, not its best seed
    make_run(tmp_path, "other-2", r=2, val_f1=0.90)
    (tmp_path / "other" / "metrics.json").unlink()
    report = collect([tmp_path]).sections[0]
    assert report.best.name == "s1 ×3 seeds" and report.best_run.name == "s2"


# ---------------------------------------------------------------- the written files

def test_markdown_numbers_equal_metrics_json(study):
    runs, _, md_path = study
    rows = {r["run"]: r for r in _md_table(md_path.read_text(), "## Results")}
    assert set(rows) == {"full", "ia3", "lora-r16", "lora-r8-s1 ×3 seeds"}
    for name in ("full", "ia3", "lora-r16"):
        m, row = _metrics(runs[name]), rows[name]
        assert row["seeds"] == "1" and row["method"] == m["method"]
        assert row["val acc"] == f"{m['validation']['accuracy']:.4f}"
        assert row["val F1"] == f"{m['validation']['macro_f1']:.4f}"
        assert row["test acc"] == f"{m['test']['accuracy']:.4f}"
        assert row["test F1"] == f"{m['test']['macro_f1']:.4f}"
        assert row["trainable params"] == f"{m['params']['trainable']:,}"
        assert row["trainable %"] == f"{m['params']['trainable_pct']:.4f}%"
        assert row["train time"] == f"{m['efficiency']['train_seconds']:,.1f} s"
        assert row["peak memory"] == f"{m['efficiency']['peak_memory_bytes'] / 2**20:,.1f} MiB (CPU RSS)"
    assert rows["lora-r16"]["r"] == "16" and rows["full"]["r"] == "–"
    seeds = [_metrics(runs[f"lora-r8-s{s}"]) for s in (1, 2, 3)]
    row = rows["lora-r8-s1 ×3 seeds"]
    for col, keys in (("test acc", ("test", "accuracy")), ("val F1", ("validation", "macro_f1"))):
        values = [m[keys[0]][keys[1]] for m in seeds]
        assert row[col] == f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"
    assert row["test acc"] == "0.9000 ± 0.0200" and row["seeds"] == "3"
    assert row["train time"] == f"{statistics.mean(m['efficiency']['train_seconds'] for m in seeds):,.1f} s"


def test_failed_runs_listed_not_tabled(study):
    _, html_path, md_path = study
    md = md_path.read_text()
    failed = {r["run"]: r["status"] for r in _md_table(md, "## Failed or incomplete runs")}
    assert failed == {"broken": "failed", "unfinished": "incomplete (no metrics.json)"}
    results = md.split("## Results")[1].split("## Failed")[0]
    assert "broken" not in results and "unfinished" not in results
    assert "broken" in html_path.read_text()


def test_html_is_self_contained(study):
    _, html_path, md_path = study
    page = html_path.read_text()
    assert md_path == html_path.with_suffix(".md")
    srcs = re.findall(r'<img src="([^"]*)"', page)
    assert len(srcs) == 7 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(src|href)="(https?:|file:|/)', page)


def test_html_escapes_names(tmp_path):
    make_run(tmp_path, 'x<script>alert(1)<\\script>&"q"')
    page = build_report([tmp_path], tmp_path / "r.html")[0].read_text()
    assert "<script>" not in page
    assert "x&lt;script&gt;alert(1)&lt;\\script&gt;&amp;&quot;q&quot;" in page


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_report([tmp_path / "nope"], tmp_path / "r.html")
    make_run(tmp_path, "broken", status="failed")
    with pytest.raises(UserError, match="no completed runs") as err:
        build_report([tmp_path], tmp_path / "r.html")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"\.html"):
        build_report([tmp_path], tmp_path / "r.md")


# ---------------------------------------------------------------- what a browser shows

def _chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


# Appended to a copy of the page: after load, record which images decoded and the text a reader sees
# (innerText follows the rendering: hidden elements and <style> contents are not in it).
_PROBE = """<script>
window.addEventListener("load", () => {
  const out = {widths: Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0),
               text: document.body.innerText};
  const pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script></body>"""


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (apt-get install chromium)")
def test_browser_renders_report(study, tmp_path):
    runs, html_path, _ = study
    probe = tmp_path / "probe.html"
    probe.write_text(html_path.read_text().replace("</body>", _PROBE))
    flags = [_chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars"]
    dom = subprocess.run(flags + ["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, "the page did not finish loading in chromium"
    seen = json.loads(html.unescape(found.group(1)))
    assert len(seen["widths"]) == 7 and all(w > 100 for w in seen["widths"]), seen["widths"]
    text = seen["text"]
    for name in ("full", "ia3", "lora-r16", "lora-r8-s1 ×3 seeds", "broken"):
        assert name in text
    m = _metrics(runs["full"])
    for number in (f"{m['test']['accuracy']:.4f}", f"{m['params']['trainable']:,}", "0.9000 ± 0.0200"):
        assert number in text
    assert "Best by validation macro-F1: lora-r16" in text

    shot = tmp_path / "shot.png"
    subprocess.run(flags + ["--window-size=1400,2400", f"--screenshot={shot}", html_path.as_uri()],
                   capture_output=True, timeout=120, cwd=tmp_path)
    assert shot.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(shot)
    assert image.shape[:2] == (2400, 1400) and image.std() > 0.05  # not a blank page
