"""The model card (README.md) of a run's weights folder, adapter/ or model/: what the model is (base
model by name, method, head, labels, data, test figures, decision rule) and the code that loads it, with
peftlab and without. peft writes an empty template there; this replaces it once the run's record is
known. The loading code is the one README.md and docs/export.md give, with this run's names filled in
(tests/test_hardening3.py runs it)."""
from __future__ import annotations

import json
from pathlib import Path

from peftlab.config import Config
from peftlab.models.heads import REMOTE_FILE
from peftlab.models.loading import HUB_NAMES, is_random, resolve
from peftlab.runs.record import RunRecord

MAX_LABELS_LISTED = 40  # a card lists every label up to this many; config.json's id2label holds them all


def base_name(model: str) -> str:
    """The base model by name: a built-in alias with its hub name, a hub id, or the folder's name."""
    if model in HUB_NAMES:
        return f"{model} ({HUB_NAMES[model]})"
    return model


def _head(head: dict | None) -> str:
    if not head or head.get("kind") != "pooled":
        reason = (head or {}).get("reason")
        return "the checkpoint's own classification head" + (f" ({reason})" if reason else "")
    text = f"{head['pooling']} pooling of the token states"
    if head.get("normalize"):
        text += ", unit length" + (f", times {head['scale']:g}" if head.get("scale") else "")
    return (f"the pooled sentence embedding ({text}; read from {head.get('source', 'the checkpoint')}), not "
            f"the checkpoint's [CLS] pooler")


def _labels(names: list[str]) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:MAX_LABELS_LISTED])
    more = f", ... ({len(names)} in all: config.json id2label or metrics.json label_names)" \
        if len(names) > MAX_LABELS_LISTED else ""
    return f"{len(names)}: {shown}{more}"


def _figures(record: RunRecord) -> list[str]:
    test, val = record.test, record.validation
    rows = [f"- test accuracy {test.accuracy:.4f}, macro-F1 {test.macro_f1:.4f} "
            f"({record.split_sizes.get('test', '?')} rows)",
            f"- validation accuracy {val.accuracy:.4f}, macro-F1 {val.macro_f1:.4f} (best epoch {record.best_epoch})"]
    at = record.test_at_threshold
    if at is not None:
        rows.append(f"- test macro-F1 at the run's threshold(s): {at.macro_f1:.4f}")
    return rows


def _loading(record: RunRecord, cfg: Config, folder: Path, run_dir: Path) -> list[str]:
    adapter = folder.name != "model"
    pooled = (folder / REMOTE_FILE).is_file()
    here, names = str(folder), record.label_names
    problem = record.kind.problem_type
    scores = record.kind.probabilities_code
    lines = ["## How to load", "", "With peftlab (the run's decision rule included):", "", "```",
             f'peftlab predict {run_dir} --text "..."', "```", "", "```python", "import peftlab",
             f'run = peftlab.load_run("{run_dir}")', 'run.predict(["..."])  # [{label, confidence, probabilities}]',
             "```", ""]
    if adapter and is_random(cfg.model.name):
        return lines + [f"Without peftlab: not possible; the base ({cfg.model.name}) is random weights that were "
                        f"never saved."]
    if pooled or not adapter:
        trust = ", trust_remote_code=True" if pooled else ""
        lines += ["Without peftlab (transformers" + (" and peft" if adapter else "") + "):", "", "```python",
                  "import torch", "from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline",
                  f'model = AutoModelForSequenceClassification.from_pretrained("{here}"{trust})',
                  f'tokenizer = AutoTokenizer.from_pretrained("{here}")',
                  f'enc = tokenizer(["..."], truncation=True, max_length={cfg.data.max_length}, padding=True, '
                  f'return_tensors="pt")',
                  f"probabilities = {scores.replace('logits', 'model(**enc).logits')}",
                  f'classify = pipeline("text-classification", model="{here}"{trust})',
                  "```", ""]
        if pooled:
            lines += [f"`trust_remote_code=True` runs `{REMOTE_FILE}` from this folder (the head's pooling; it "
                      f"imports only torch and transformers: read it first). Without it transformers refuses this "
                      f"folder: its config.json names a model type of peftlab's own, so that nothing builds "
                      f"the checkpoint's [CLS] head instead in silence."
                      + (" The base model's weights are read from adapter_config.json's "
                         "`base_model_name_or_path`, then transformers loads the adapter (peft must be "
                         "installed)." if adapter else ""), ""]
            if adapter:
                lines += ["Do not load it onto a plain `AutoModelForSequenceClassification` of the base with "
                          "`PeftModel.from_pretrained`: that model classifies from the [CLS] pooler, not from "
                          "the pooled embedding this head was trained on, and its answers differ.", ""]
        return lines
    base = resolve(cfg.model.name)
    labels = json.dumps(dict(enumerate(names)))
    return lines + ["Without peftlab (transformers and peft):", "", "```python", "import torch", "from peft import PeftModel",
                    "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
                    f"id2label = {{int(k): v for k, v in {labels}.items()}}",
                    f'base = AutoModelForSequenceClassification.from_pretrained("{base}", num_labels={len(names)}, '
                    f'id2label=id2label, label2id={{v: k for k, v in id2label.items()}}, problem_type="{problem}", '
                    f"ignore_mismatched_sizes=True)",
                    f'model = PeftModel.from_pretrained(base, "{here}").eval()  # the trained head included',
                    f'tokenizer = AutoTokenizer.from_pretrained("{here}")',
                    f'enc = tokenizer(["..."], truncation=True, max_length={cfg.data.max_length}, padding=True, '
                    f'return_tensors="pt")',
                    f"probabilities = {scores.replace('logits', 'model(**enc).logits')}", "```", ""]


def model_card(record: RunRecord, cfg: Config, folder: Path, run_dir: Path) -> str:
    """README.md of the weights `folder` (adapter/ or model/) of the completed run in `run_dir`."""
    adapter = folder.name != "model"
    base = HUB_NAMES.get(cfg.model.name, cfg.model.name)
    tags = ["peftlab", record.method, "text-classification"]
    front = ["---", f"base_model: {json.dumps(base)}", f"library_name: {'peft' if adapter else 'transformers'}",
             "pipeline_tag: text-classification", f"tags: {json.dumps(tags)}", "---", ""]
    rule = record.kind.rule(record.label_names, record.threshold, record.temperature)
    where = f" (read from {resolve(cfg.model.name)})" if resolve(cfg.model.name) != cfg.model.name else ""
    body = [f"# {record.method} on {base_name(cfg.model.name)}: {record.dataset}", "",
            f"A text classifier trained with peftlab ({'the adapter' if adapter else 'the whole model'}; run "
            f"directory `{run_dir}`, whose metrics.json holds every figure).", "",
            f"- base model: {base_name(cfg.model.name)}{where}",
            f"- method: {record.method}, {record.params.trainable:,} of {record.params.total:,} parameters trained",
            f"- head: {_head(record.head)}",
            f"- task: {record.kind.title} ({record.kind.probabilities_words})",
            f"- labels: {_labels(record.label_names)}",
            f"- data: {record.dataset}; " + "; ".join(f"{s} {record.split_sizes.get(s, 0):,} rows "
                                                       f"({record.split_sources.get(s, '')})"
                                                       for s in ("train", "validation", "test")),
            f"- texts: truncated at {cfg.data.max_length} tokens", "", "## Figures", "", *_figures(record), "",
            "## Decision rule", "", f"{rule['rule']}; temperature {rule['temperature']:g}"
            + (f", threshold {rule['threshold']:g}" if rule.get("threshold") is not None else "")
            + (" (per-label thresholds: metrics.json test_at_threshold)" if rule.get("thresholds") else "")
            + ". The code below gives the model's own probabilities (as predictions.csv holds them); "
              "`peftlab predict` applies this rule.", "",
            *_loading(record, cfg, folder, run_dir)]
    return "\n".join(front + body).rstrip() + "\n"
