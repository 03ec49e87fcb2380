"""Invariants of the fast training path (in the spirit of trl's padding-free tests): how examples are
batched and padded, the first-token-only last layer and merged LoRA must not change what the model
computes; length grouping must train as well as random batches (transformers 5.x's group_by_length
trained to chance); batch orders are complete and reproducible; the tokenization cache is used and
invalidated correctly."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from peftlab.config import load_config
from peftlab.data.batching import batch_order, collate, pad_multiple
from peftlab.data.tokenize import Encoded, encode
from peftlab.evaluation.predict import predict_logits
from peftlab.models.build import build_model
from peftlab.models.loading import load_tokenizer
from peftlab.models.speed import first_token_only, merged_lora
from peftlab.runs.rundir import RunDir
from peftlab.training.trainer import train
from tests.conftest import make_rows

CPU = torch.device("cpu")
MAX_LENGTH = 48


@pytest.fixture(scope="module")
def examples(tiny_model_dir) -> Encoded:
    rows = make_rows(40, seed=7)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    return encode(tokenizer, [r["text"] for r in rows], np.arange(40) % 3, MAX_LENGTH)


def _model(tiny_model_dir, method: str = "lora", seed: int = 0):
    torch.manual_seed(seed)
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"method.name={method}"])
    model = build_model(cfg, ["a", "b", "c"], CPU).model
    with torch.no_grad():  # a trained-looking adapter: B is zero at init, which would hide merge errors
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval()  # no dropout: the same input must give the same output


def _per_example_loss(model, data: Encoded, batches, **collate_kwargs) -> np.ndarray:
    out = np.zeros(len(data))
    with torch.no_grad():
        for index in batches:
            batch = collate(data, index, 0, **collate_kwargs)
            labels = batch.pop("labels")
            out[index] = F.cross_entropy(model(**batch).logits, labels, reduction="none").numpy()
    return out


def test_same_loss_however_examples_are_padded_and_batched(tiny_model_dir, examples):
    model = _model(tiny_model_dir)
    n = len(examples)
    one_by_one = _per_example_loss(model, examples, [np.array([i]) for i in range(n)], pad_to_multiple=1)
    variants = {
        "padded to max_length": _per_example_loss(model, examples, batch_order(examples.lengths, 8, 0, 0, "random"),
                                                  pad_to=MAX_LENGTH),
        "dynamic, random batches": _per_example_loss(model, examples, batch_order(examples.lengths, 8, 0, 0, "random"),
                                                     pad_to_multiple=1),
        "length-grouped": _per_example_loss(model, examples, batch_order(examples.lengths, 8, 0, 0, "length_grouped"),
                                            pad_to_multiple=1),
        "length-grouped, widths rounded to 8": _per_example_loss(
            model, examples, batch_order(examples.lengths, 8, 0, 1, "length_grouped"), pad_to_multiple=8),
    }
    for name, losses in variants.items():
        np.testing.assert_allclose(losses, one_by_one, atol=1e-5, err_msg=name)
    assert one_by_one.std() > 0  # a real comparison: losses differ between examples


def test_first_token_only_keeps_loss_and_gradients(tiny_model_dir, examples):
    """The head reads only the first position, so computing the last layer's output projection and
    feed-forward there alone changes neither the loss nor any gradient."""
    batch = collate(examples, np.arange(16), 0, 1)
    labels = batch.pop("labels")

    def loss_and_grads(model):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(**batch).logits, labels)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model = _model(tiny_model_dir)
    full_loss, full_grads = loss_and_grads(model)
    handle = first_token_only(model)
    assert handle is not None and first_token_only(model) is None  # applied once, not stacked
    trimmed_loss, trimmed_grads = loss_and_grads(model)
    handle.remove()
    assert abs(full_loss - trimmed_loss) < 1e-5
    assert full_grads.keys() == trimmed_grads.keys() and any("lora_A" in n for n in full_grads)
    for name in full_grads:
        torch.testing.assert_close(trimmed_grads[name], full_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert first_token_only(torch.nn.Linear(2, 2)) is None  # unknown models are left alone


def test_prediction_merged_lora_matches_and_restores_weights(tiny_model_dir, examples):
    model = _model(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = np.stack([model(**{k: v for k, v in collate(examples, np.array([i]), 0, 1).items() if k != "labels"})
                          .logits[0].detach().numpy() for i in range(len(examples))])
    logits = predict_logits(model, examples, 0, CPU, batch_size=7)  # merged, first-token-only, sorted batches
    np.testing.assert_allclose(logits, reference, atol=1e-5)  # and back in the original order
    for name, p in model.named_parameters():  # exactly, not approximately: no drift over many evaluations
        assert torch.equal(p, before[name]), name
    with merged_lora(model):
        assert any(getattr(m, "merged_adapters", None) for m in model.modules())
    assert not any(getattr(m, "merged_adapters", None) for m in model.modules())


def test_length_grouped_trains_like_random_batches(tmp_path, tiny_model_dir, topic_data_dir):
    """Length grouping must not cost learning: both samplers reach clearly-above-chance validation
    accuracy (three topics: chance is 1/3) with a similar training loss."""
    results = {}
    for sampler in ("length_grouped", "random"):
        cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.path={topic_data_dir}", "data.max_length=48",
                                 "train.epochs=6", "train.batch_size=16", "train.learning_rate=0.05",
                                 f"train.sampler={sampler}", "output.plots=false", "eval.baseline=false"])
        run = RunDir(tmp_path / sampler).create()
        results[sampler] = train(cfg, run, progress=False).model_dump()
        history = [json.loads(line) for line in run.history_file.read_text().splitlines()]
        results[sampler]["last_train_loss"] = [r for r in history if r["kind"] == "epoch"][-1]["train_loss"]
    grouped, plain = results["length_grouped"], results["random"]
    for r in (grouped, plain):
        assert r["validation"]["accuracy"] >= 0.8, r["validation"]
        assert r["last_train_loss"] < 0.6  # well below log(3) = 1.10
    assert abs(grouped["validation"]["accuracy"] - plain["validation"]["accuracy"]) <= 0.1
    assert abs(grouped["last_train_loss"] - plain["last_train_loss"]) <= 0.25
    assert grouped["efficiency"]["optimizer_steps"] == plain["efficiency"]["optimizer_steps"] == 6 * 15


@pytest.mark.parametrize("strategy", ["length_grouped", "random"])
@pytest.mark.parametrize("n,batch_size", [(1, 4), (100, 8), (101, 8), (1000, 32), (37, 64)])
def test_batch_order_covers_every_example_once_and_is_deterministic(strategy, n, batch_size):
    lengths = np.random.default_rng(n).integers(1, 129, size=n)
    batches = batch_order(lengths, batch_size, 42, 0, strategy)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(n))  # every example, exactly once
    assert all(len(b) == batch_size for b in batches if len(b) != n % batch_size)
    assert sum(len(b) != batch_size for b in batches) <= 1
    again = batch_order(lengths, batch_size, 42, 0, strategy)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again)) and len(again) == len(batches)
    if n >= 100:  # another epoch or seed gives another order
        assert not np.array_equal(flat, np.concatenate(batch_order(lengths, batch_size, 42, 1, strategy)))
        assert not np.array_equal(flat, np.concatenate(batch_order(lengths, batch_size, 43, 0, strategy)))


def test_length_grouping_cuts_padding_but_keeps_batches_mixed():
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 129, size=3200)
    labels = rng.integers(0, 2, size=3200)

    def padded(strategy):
        return sum(len(b) * lengths[b].max() for b in batch_order(lengths, 32, 1, 0, strategy))

    assert padded("length_grouped") < 0.7 * padded("random")
    grouped = batch_order(lengths, 32, 1, 0, "length_grouped")
    # batches are not ordered by length over the epoch (the order is shuffled again)...
    widths = [lengths[b].max() for b in grouped]
    assert abs(np.corrcoef(np.arange(len(widths)), widths)[0, 1]) < 0.2
    # ...and labels stay mixed inside batches
    assert np.mean([0 < labels[b].mean() < 1 for b in grouped]) > 0.95


def test_pad_multiple_keeps_shapes_few_on_gpu_and_padding_nil_on_cpu(examples):
    assert pad_multiple(CPU) == 1
    assert pad_multiple(torch.device("cuda")) == 8
    for max_length in (64, 128, 512):
        multiple = pad_multiple(torch.device("cuda"), compiled=True, max_length=max_length)
        widths = {-(-n // multiple) * multiple for n in range(1, max_length + 1)}
        assert len(widths) <= 4 and max(widths) >= max_length and multiple % 8 == 0
    batch = collate(examples, np.arange(5), 0, pad_multiple(CPU))
    assert batch["input_ids"].shape[1] == examples.lengths[:5].max()  # no padding beyond the longest
    assert int(batch["attention_mask"].sum()) == int(examples.lengths[:5].sum())


def test_tokenization_cache_hit_and_invalidation(tmp_path, tiny_model_dir, monkeypatch):
    import peftlab.data.tokenize as tok_module

    tokenizer = load_tokenizer(str(tiny_model_dir))
    texts = [r["text"] for r in make_rows(30, seed=3)]
    labels = np.arange(30) % 3
    calls = []
    real = tok_module._tokenize
    monkeypatch.setattr(tok_module, "_tokenize", lambda *a: calls.append(a[2]) or real(*a))

    first = encode(tokenizer, texts, labels, 32, tmp_path)
    assert len(calls) == 1 and len(list(tmp_path.glob("tok-*.npz"))) == 1
    second = encode(tokenizer, texts, labels, 32, tmp_path)
    assert len(calls) == 1  # hit: nothing re-tokenized
    assert np.array_equal(first.ids, second.ids) and np.array_equal(first.offsets, second.offsets)

    encode(tokenizer, texts, labels, 16, tmp_path)                   # another max_length
    encode(tokenizer, texts[:-1] + ["changed"], labels, 32, tmp_path)  # other texts
    other = load_tokenizer(str(tiny_model_dir))
    other.add_tokens(["zzqx"])                                        # another tokenizer
    encode(other, texts, labels, 32, tmp_path)
    assert len(calls) == 4 and len(list(tmp_path.glob("tok-*.npz"))) == 4
    encode(other, texts, labels, 32, tmp_path)
    assert len(calls) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_training_on_gpu_matches_eager(tmp_path, tiny_overrides):
    losses = {}
    for compiled in (False, True):
        cfg = load_config(None, tiny_overrides + ["train.device=cuda", "train.precision=fp32",
                                                  f"train.compile={str(compiled).lower()}", "eval.baseline=false"])
        m = train(cfg, RunDir(tmp_path / str(compiled)).create(), progress=False)
        assert m.status == "completed"
        losses[compiled] = m.validation.loss
    assert abs(losses[True] - losses[False]) < 0.05
