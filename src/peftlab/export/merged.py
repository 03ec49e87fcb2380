"""`merged`: a plain Hugging Face model folder (adapter folded into the weights, trained head, the run's
labels, problem type and decision rule, tokenizer) that AutoModelForSequenceClassification and pipeline()
load without peft or peftlab (a pooled-head run's with trust_remote_code=True: models/heads.py)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from peftlab.errors import UserError
from peftlab.export.common import Source, check_output, compare, encoded, load_source, save_tokenizer, staged, \
    test_set, write_info
from peftlab.models import heads


def save_merged(source: Source, directory: Path) -> None:
    source.model.save_pretrained(directory)
    pooled_head_code(source.model, directory)
    save_tokenizer(source, directory)


def pooled_head_code(model: torch.nn.Module, directory: Path) -> bool:
    """A run whose head reads the pooled embedding (models/heads.py): config.json becomes a pooled run's
    (a model type transformers does not know, auto_map to the head's code copied beside it), so that
    transformers computes what the run did with trust_remote_code=True and refuses without it."""
    if not heads.installed(model):
        return False
    if not heads.save_remote_code(model, directory):
        raise UserError(f"a pooled head on {type(model).__name__} cannot be exported as a merged folder yet; "
                        f"use --format onnx, or train with model.head=cls")
    return True


def reload_checked(directory: Path) -> torch.nn.Module:
    """Load the folder the way users will, and refuse one whose weights do not all load: a missing head
    would otherwise come back silently random (peft #577, #1070)."""
    from transformers import AutoModelForSequenceClassification

    remote = (directory / heads.REMOTE_FILE).exists()  # a pooled head: its code, ours, ships in the folder
    model, loading = AutoModelForSequenceClassification.from_pretrained(directory, output_loading_info=True,
                                                                        trust_remote_code=remote)
    bad = {k: v for k, v in loading.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise RuntimeError(f"the exported model in {directory} does not load cleanly: {bad}")
    return model.eval()


def torch_logits(model: torch.nn.Module, source: Source, texts: list[str]):
    from peftlab.evaluation.predict import predict_logits

    return predict_logits(model, encoded(source, texts), source.pad_id, torch.device("cpu"))


def export_merged(run_dir: str | Path, output: str | Path) -> dict:
    """Write the merged model folder to `output`; returns what export_info.json records."""
    out = check_output(output)
    start = time.perf_counter()
    source = load_source(run_dir)
    with staged(out) as tmp:
        save_merged(source, tmp)
        files = sorted(p.name for p in tmp.iterdir())
        remote = heads.REMOTE_FILE in files  # a pooled head: loaded with trust_remote_code=True
        model = reload_checked(tmp)
        test = test_set(source)
        check = None if test is None else compare(torch_logits(model, source, test.texts), test, source)
        info = {"format": "merged", **source.info(), "files": files, "trust_remote_code": remote, "check": check,
                "seconds": round(time.perf_counter() - start, 2)}
        write_info(tmp, info)
    return {**info, "output": str(out)}
