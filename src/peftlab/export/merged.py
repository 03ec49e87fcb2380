"""`merged`: a plain Hugging Face model folder (adapter folded into the weights, trained head, the run's
labels, problem type and decision rule, tokenizer) that AutoModelForSequenceClassification and pipeline()
load without peft or peftlab."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from peftlab.errors import UserError
from peftlab.export.common import Source, check_output, compare, encoded, load_source, save_tokenizer, staged, \
    test_set, write_info


def save_merged(source: Source, directory: Path) -> None:
    pooled_head_code(source.model, directory)
    source.model.save_pretrained(directory)
    save_tokenizer(source, directory)


def pooled_head_code(model: torch.nn.Module, directory: Path) -> bool:
    """A run whose head reads the pooled embedding (models/heads.py): that file goes beside the weights as
    remote code, and config.json's auto_map names its class, so transformers computes what the run did
    (AutoModelForSequenceClassification / pipeline(..., trust_remote_code=True))."""
    import shutil

    from peftlab.models import heads

    if not heads.installed(model):
        return False
    name = "Pooled" + type(model).__name__
    if not hasattr(heads, name):
        raise UserError(f"a pooled head on {type(model).__name__} cannot be exported as a merged folder yet; "
                        f"use --format onnx, or train with model.head=cls")
    shutil.copyfile(heads.__file__, directory / heads.REMOTE_FILE)
    model.config.auto_map = {"AutoModelForSequenceClassification": f"{heads.REMOTE_FILE[:-3]}.{name}"}
    model.config.architectures = [name]
    return True


def reload_checked(directory: Path) -> torch.nn.Module:
    """Load the folder the way users will, and refuse one whose weights do not all load: a missing head
    would otherwise come back silently random (peft #577, #1070)."""
    from transformers import AutoModelForSequenceClassification

    from peftlab.models.heads import REMOTE_FILE

    remote = (directory / REMOTE_FILE).exists()  # a pooled head: its code ships in the folder
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
        model = reload_checked(tmp)
        test = test_set(source)
        check = None if test is None else compare(torch_logits(model, source, test.texts), test, source)
        info = {"format": "merged", **source.info(), "files": files, "check": check,
                "seconds": round(time.perf_counter() - start, 2)}
        write_info(tmp, info)
    return {**info, "output": str(out)}
