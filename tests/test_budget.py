"""Exact trainable counts before training (meta device), `peftlab params`, `peftlab plan`, and budgets
in sweeps: every count must equal the one measured on the real model."""
from __future__ import annotations

import json

import pytest
import torch

from peftlab.cli import main
from peftlab.config import load_config
from peftlab.errors import UserError
from peftlab.models.build import build_model
from peftlab.models.params import count_parameters
from peftlab.models.params import count_config, label_names_for
from peftlab.models.plan import plan

TARGETED = ["method.layers=[0]", "method.target_modules=[query,key,attention.output.dense]",
            "method.rank_pattern={attention.output.dense: 2}"]
CASES = {
    "lora": ["method.name=lora", "method.r=8"],
    "lora-targeted": ["method.name=lora", "method.r=4"] + TARGETED,
    "qlora": ["method.name=qlora", "method.r=4", "method.layers=[1]"],
    "ia3-layer1": ["method.name=ia3", "method.layers=[1]"],
    "full": ["method.name=full"],
}


def real_count(cfg) -> dict:
    """Build the model for real (weights loaded, method applied, as training does) and count."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # qlora's fallback on CPU warns
        model = build_model(cfg, label_names_for(cfg), torch.device("cpu")).model
    counted = count_parameters(model)
    head = sum(p.numel() for n, p in model.named_parameters()
               if p.requires_grad and "classifier" in n.split(".") and ".original_module." not in n)
    adapter = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and (".lora_" in n or ".ia3_" in n))
    return {**counted, "head": head, "adapter": adapter}


@pytest.mark.parametrize("case", list(CASES))
def test_meta_count_equals_built_model(case, tiny_overrides):
    cfg = load_config(None, tiny_overrides + CASES[case])
    meta = count_config(cfg)
    real = real_count(cfg)
    assert (meta.trainable, meta.total) == (real["trainable"], real["total"])
    assert (meta.adapter, meta.head) == (real["adapter"], real["head"])
    assert meta.adapter + meta.head + meta.other == meta.trainable
    if case == "full":
        assert meta.adapter == 0 and meta.other > 0 and meta.trainable == meta.total
    else:
        assert meta.other == 0 and meta.adapter > 0
    if case == "lora-targeted":
        # layer 0 only; query and key at r=4 (32 -> 32), attention.output.dense at r=2
        assert meta.per_module == {"attention.self.query": 4 * 64, "attention.self.key": 4 * 64,
                                   "attention.output.dense": 2 * 64}
        assert meta.head == 32 * 3 + 3  # 3 topics


def test_params_cli_needs_no_weights(tiny_overrides, capsys, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    def no_weights(*a, **k):
        raise AssertionError("params must not load weights")
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", no_weights)
    assert main(["params", "--set", "budget.max_trainable_params=1000"] + sum((["--set", s] for s in tiny_overrides + CASES["lora-targeted"]), [])) == 0
    out = capsys.readouterr().out
    cfg = load_config(None, tiny_overrides + CASES["lora-targeted"])
    c = count_config(cfg)
    for label, value in (("adapter (LoRA)", c.adapter), ("classification head", c.head), ("other trainable", 0),
                         ("total trainable", c.trainable)):
        assert f"  {label:<21} {value:>13,}" in out
    assert f"budget 1,000: fits ({1000 - c.trainable:,} to spare)" in out
    # only --set, no config file; a hub model's shape without the hub (its config is known)
    assert main(["params", "--set", "model.name=bert-base-uncased", "--set", "data.name=ag_news",
                 "--set", "method.name=lora", "--set", "method.r=8"]) == 0
    out = capsys.readouterr().out
    # BERT-base: 12 layers x (query + value) x r 8 x (768 + 768); head 768 x 4 + 4
    assert f"{12 * 2 * 8 * 1536:,}" in out and f"{768 * 4 + 4:,}" in out


def test_plan_configurations_fit_and_match_built_models(tiny_overrides, capsys):
    budget = 1500
    cfg = load_config(None, tiny_overrides)
    chosen, head = plan(cfg, budget, top=6)
    assert len(chosen) == 6 and head == 32 * 3 + 3
    assert [c.trainable for c in chosen] == sorted((c.trainable for c in chosen), reverse=True)
    for c in chosen:
        assert c.trainable <= budget and c.trainable == c.estimate
        built = load_config(None, tiny_overrides + ["method.name=lora"] + c.overrides)
        assert real_count(built)["trainable"] == c.trainable
    # the biggest placement fits snugly: doubling its rank would not fit
    assert head + 2 * (chosen[0].trainable - head) > budget

    assert main(["plan", "--budget", str(budget), "--top", "3"] + sum((["--set", s] for s in tiny_overrides), [])) == 0
    out = capsys.readouterr().out
    assert f"{chosen[0].trainable:,}" in out and "to use #1: --set method.r=" in out
    with pytest.raises(UserError, match="no LoRA configuration fits"):
        main(["--debug", "plan", "--budget", "50"] + sum((["--set", s] for s in tiny_overrides), []))


def test_plan_keeps_the_configs_per_module_ranks(tiny_overrides):
    # targeted LoRA: attention.output.dense keeps rank 2 from rank_pattern; the config's layers are a candidate
    cfg = load_config(None, tiny_overrides + TARGETED)
    chosen, _ = plan(cfg, 1000, top=20)
    assert any(c.layers == (0,) and c.target_modules == ("query", "key", "attention.output.dense") for c in chosen)
    for c in chosen:
        assert c.trainable <= 1000
        built = load_config(None, tiny_overrides + TARGETED + ["method.name=lora"] + c.overrides)
        assert real_count(built)["trainable"] == c.trainable


def test_budgeted_sweep_skips_and_lists_over_budget(tmp_path, tiny_overrides, capsys):
    from peftlab.sweeps.runner import Options, run_sweep

    grid = ("sweep.grid={method: [{name: full}, {name: lora, r: 4, layers: [0], "
            "target_modules: [query, key, attention.output.dense], rank_pattern: {attention.output.dense: 2}}, "
            "{name: ia3, layers: [1]}]}")
    cfg = load_config(None, tiny_overrides + [grid, "budget.max_trainable_params=5000", "train.epochs=1"])
    summary = run_sweep(cfg, Options(out_dir=tmp_path / "budget", progress=False))
    full = load_config(None, tiny_overrides + ["method.name=full"])
    assert summary["skipped"] == [{"name": "full", "runs": ["full"], "trainable": count_config(full).trainable,
                                   "budget": 5000}]
    assert "skipped (over the budget of 5,000 trainable parameters):" in capsys.readouterr().out
    assert not (tmp_path / "budget" / "trials" / "full").exists()
    ran = [r for r in summary["runs"] if r["status"] == "completed"]
    assert len(ran) == 2
    for r in ran:
        m = json.loads((tmp_path / "budget" / r["run_dir"] / "metrics.json").read_text())
        from peftlab.config.load import build_config

        before = count_config(build_config(m["config"])).trainable
        assert m["params"]["trainable"] == before <= 5000  # known before training, measured after
    # the report lists the skipped configuration with its count
    assert main(["report", str(tmp_path / "budget")]) == 0
    md = (tmp_path / "budget" / "report.md").read_text()
    assert f"skipped: over budget ({count_config(full).trainable:,} trainable parameters &gt; 5,000)" in md  # escaped
