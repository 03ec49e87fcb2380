"""Writing files so that nothing half-written ever looks like a result.

Every output is written under a temporary name beside its final one (`.NAME.PID-XXXXXXXX.tmp`, a file
or a folder) and renamed into place only once it is whole; a failed write removes its temporary, and
temporaries left by a killed process are removed by the next run (clean_stale). An operating-system
write error (file too large, no space, read-only, permission) becomes one UserError line naming the
file, whichever library raised it: Python (OSError), safetensors and tokenizers ("... (os error 27)")
or torch.save (which hides the OSError of the file it writes behind "unexpected pos").
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from peftlab.errors import UserError

_REASONS = {
    errno.EFBIG: "file too large (a file-size limit: ulimit -f)",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
WRITE_ERRORS = frozenset(_REASONS)
# what to do, by cause: "free space" is advice for a full disk only
_ADVICE = {
    errno.ENOSPC: "free space, or choose another output location",
    errno.EDQUOT: "free space within your quota, or choose another output location",
    errno.EFBIG: "raise the limit, or choose another output location",
    errno.ENOENT: "its folder is gone (removed or moved while writing, or a symbolic link to nowhere): create "
                  "it again, or choose another output location",
    errno.ENOTDIR: "a part of its path is a file, not a folder: choose another output location",
    errno.ELOOP: "its path loops through symbolic links: choose another output location",
}
# .NAME.PID.tmp, .NAME.PID-HEX.tmp (optionally with a suffix kept for libraries that want one: .tmp.npz)
_TEMP = re.compile(r"^\.(.+)\.(\d+)(?:-[0-9a-f]+)?\.tmp(?:\.\w+)?$")
_OS_ERROR = re.compile(r"os error (\d+)")
_SQLITE = (("database or disk is full", errno.ENOSPC), ("attempt to write a readonly database", errno.EROFS))


def temp_name(path: Path) -> Path:
    """A fresh hidden name beside `path`, with this process's id (so clean_stale knows whose it is)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def os_error_of(error: BaseException) -> OSError | None:
    """The operating-system error behind `error`, when there is one to tell."""
    if isinstance(error, OSError) and error.errno is not None:
        return error
    found = getattr(error, "_peftlab_os_error", None)
    if found is not None:
        return found
    match = _OS_ERROR.search(str(error))
    if match:
        code = int(match.group(1))
        return OSError(code, os.strerror(code))
    for words, code in _SQLITE:  # optuna's study.db (sqlite names no errno)
        if words in str(error):
            return OSError(code, os.strerror(code))
    cause = error.__cause__ or error.__context__
    return os_error_of(cause) if cause is not None and cause is not error else None


def write_error(error: OSError, path: str | Path) -> UserError:
    """One line: which file could not be written, why, and what to do."""
    reason = _REASONS.get(error.errno, error.strerror or str(error))
    where = path if isinstance(path, str) and path == "a file" else repr(str(path))
    advice = _ADVICE.get(error.errno, "choose a writable output location")
    return UserError(f"cannot write {where}: {reason}; nothing half-written was kept: {advice}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def translated(path: str | Path) -> Iterator[None]:
    """Operating-system write errors inside the block become one UserError naming `path`."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - libraries wrap write errors in their own types
        found = os_error_of(e)
        if found is None or found.errno not in _REASONS and not isinstance(e, OSError):
            raise
        raise write_error(found, path) from None


@contextlib.contextmanager
def replacing(path: str | Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path (a made folder when `directory`) that becomes `path` when the block
    succeeds; on any failure the temporary is removed and the old `path`, if any, is left as it was.
    A folder replaces an existing one (the old one is removed after the rename)."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with translated(path):
            if directory:
                tmp.mkdir(parents=False)
            yield tmp
            if directory and path.is_dir():
                old = temp_name(path)
                os.replace(path, old)
                os.replace(tmp, path)
                _remove(old)
            else:
                os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def write_text(path: str | Path, text: str) -> None:
    with replacing(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


class _Recording:
    """A file object that remembers the OSError of a failed write: torch.save swallows it."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def torch_save(obj, path: str | Path) -> None:
    """torch.save, atomically, with torch's "unexpected pos" told as the OSError it was."""
    import torch

    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            recording = _Recording(f)
            try:
                torch.save(obj, recording)
            except RuntimeError as e:
                if recording.error is not None:
                    raise recording.error from None
                raise


def append_text(path: str | Path, text: str) -> None:
    """Append (logs such as history.jsonl, whose readers skip a torn last line), errors translated."""
    with translated(path):
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)


def clean_stale(directory: str | Path, name: str | None = None) -> list[Path]:
    """Remove the temporaries (`.NAME.PID[-HEX].tmp`) that processes no longer running left in
    `directory` (only those of `name` when given: a folder that is not ours): a kill mid-write leaves
    one. Returns what it removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in list(directory.glob(f".{glob.escape(name)}.*" if name else ".*.tmp*")):
        match = _TEMP.match(entry.name)
        if match and (name is None or match.group(1) == name) and not _alive(int(match.group(2))):
            _remove(entry)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's live process (or no such pid at all: overflow) - leave it
    return True
