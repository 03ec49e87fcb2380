"""Shared fixtures: a tiny randomly initialised BERT saved as a local model folder (the real
all-MiniLM-L6-v2 tokenizer, 2 layers of width 32), a small learnable text dataset, and an
isolated tokenization cache."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

# Tiny models gain nothing from intra-op threads, and when several processes share 2 cores, OpenMP
# threads that spin-wait for each other slow each step down by orders of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The suite's figures must not depend on whether the CPU has bf16 units (precision=auto would pick bf16
# there): it runs as on a CPU without them; tests of the bf16 path set PEFTLAB_CPU_BF16=1 themselves, and
# PEFTLAB_CPU_BF16=1 pytest runs the whole suite as on a bf16 CPU.
os.environ.setdefault("PEFTLAB_CPU_BF16", "0")
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path_factory.getbasetemp() / "tokcache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_bert(path: Path, hidden_size: int, intermediate_size: int) -> Path:
    """A randomly initialised 2-layer BERT (seed 0) with MiniLM's tokenizer, saved to `path`."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from peftlab.models.loading import load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer("minilm-l6")
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden_size, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=intermediate_size, max_position_embeddings=128)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_decoder(path: Path, model_type: str = "llama") -> Path:
    """A randomly initialised 2-layer decoder (seed 0) of width 64 (widths bitsandbytes 4-bit takes), with
    MiniLM's vocabulary in a decoder's kind of tokenizer: nothing added around a text, an end-of-text token
    and no pad token (as most decoders' come)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerFast

    from peftlab.models.loading import load_tokenizer

    backend = Tokenizer.from_str(load_tokenizer("minilm-l6").backend_tokenizer.to_str())
    backend.post_processor = None  # no [CLS] ... [SEP] around the text
    backend.no_padding()
    backend.no_truncation()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="[SEP]", unk_token="[UNK]")
    assert tokenizer.pad_token is None
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                                  max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=None, bos_token_id=None, tie_word_embeddings=False)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return write_decoder(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    return write_decoder(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_bert(tmp_path_factory.mktemp("tiny-bert"), hidden_size=32, intermediate_size=64)


@pytest.fixture(scope="session")
def tiny_st_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model as a sentence-transformers checkpoint (mean pooling, then unit length), so that
    `model.head: auto` gives it the pooled head, as it does all-MiniLM-L6-v2 and all-mpnet-base-v2."""
    import shutil

    from transformers import BertModel

    path = tmp_path_factory.mktemp("tiny-st") / "model"
    shutil.copytree(tiny_model_dir, path)
    BertModel.from_pretrained(tiny_model_dir).save_pretrained(path)  # headless, as sentence-transformers saves it
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    return path


WORDS = {
    "sport": ["match", "goal", "team", "coach", "league", "score", "player", "season"],
    "tech": ["software", "chip", "computer", "network", "phone", "data", "internet", "robot"],
    "food": ["recipe", "bread", "cheese", "soup", "kitchen", "flavour", "dinner", "salad"],
}
FILLER = ["the", "a", "today", "new", "big", "small", "people", "said", "was", "very", "and", "then"]


def make_rows(n: int, seed: int = 0, topics: dict[str, list[str]] = WORDS) -> list[dict]:
    """Texts of varied length whose class shows in topic words: learnable by a tiny model in a few steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = list(topics)[i % len(topics)]
        words = [rng.choice(topics[label]) if rng.random() < 0.4 else rng.choice(FILLER)
                 for _ in range(rng.randint(4, 40))]
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_splits(path: Path, make, sizes: tuple[int, int, int]) -> Path:
    """train/validation/test JSON Lines files of make(n, seed) rows in `path`."""
    for split, n, seed in zip(("train", "validation", "test"), sizes, (1, 2, 3)):
        with open(path / f"{split}.jsonl", "w") as f:
            for row in make(n, seed):
                f.write(json.dumps(row) + "\n")
    return path


def isolated_module_env(tmp_path_factory, name: str):
    """For module-scoped fixtures, which run before conftest's function-scoped isolation: a private
    tokenization cache, the hub offline, and a fresh directory (yielded)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PEFTLAB_CACHE", str(tmp_path_factory.mktemp(f"{name}-tokcache")))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield tmp_path_factory.mktemp(name)


@pytest.fixture(scope="session")
def topic_data_dir(tmp_path_factory) -> Path:
    """A directory with train/validation/test JSON Lines files (string labels)."""
    return write_splits(tmp_path_factory.mktemp("topics"), make_rows, (240, 60, 60))


@pytest.fixture
def tiny_overrides(tiny_model_dir, topic_data_dir) -> list[str]:
    """--set overrides for a fast real run of the tiny model on the topic data."""
    return _tiny_run(tiny_model_dir, topic_data_dir, epochs=2)


def _tiny_run(model_dir: Path, data_dir: Path, epochs: int, *extra: str) -> list[str]:
    return [f"model.name={model_dir}", f"data.path={data_dir}", *extra, "data.max_length=48",
            f"train.epochs={epochs}", "train.batch_size=16", "train.learning_rate=0.005", "output.plots=false"]


def make_label_set_rows(n: int, seed: int = 0) -> list[dict]:
    """Multi-label texts: each mixes the topic words of one to three topics (a few texts none), and its
    labels are those topics: learnable by a tiny model in a few steps."""
    rng = random.Random(seed)
    topics = list(WORDS)
    rows = []
    for i in range(n):
        k = [0, 1, 1, 2, 2, 3][i % 6]
        chosen = sorted(rng.sample(topics, k))
        words = [rng.choice(WORDS[rng.choice(chosen)]) if chosen and rng.random() < 0.5 else rng.choice(FILLER)
                 for _ in range(rng.randint(6, 40))]
        rows.append({"text": " ".join(words), "labels": chosen})
    return rows


@pytest.fixture(scope="session")
def label_set_data_dir(tmp_path_factory) -> Path:
    """A directory with multi-label train/validation/test JSON Lines files ("labels": a list per row)."""
    return write_splits(tmp_path_factory.mktemp("label-sets"), make_label_set_rows, (300, 90, 90))


@pytest.fixture
def multi_label_overrides(tiny_model_dir, label_set_data_dir) -> list[str]:
    """--set overrides for a fast real multi-label run of the tiny model."""
    return _tiny_run(tiny_model_dir, label_set_data_dir, 3, "data.multi_label=true", "data.label_column=labels")
