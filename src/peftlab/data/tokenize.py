"""Tokenize once per (tokenizer, texts, max_length) and keep it on disk, so repeated runs and sweep
trials skip the work. Sequences are stored unpadded: padding is decided per batch."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Encoded:
    """Token ids of one split, unpadded: sequence i is ids[offsets[i]:offsets[i + 1]]."""
    ids: np.ndarray      # int32, all sequences concatenated
    offsets: np.ndarray  # int64, len = n + 1
    labels: np.ndarray   # int64

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        # computed once per offsets array (the training loop reads it every step)
        cached = self.__dict__.get("_lengths")
        if cached is None or cached[0] is not self.offsets:
            cached = (self.offsets, np.diff(self.offsets))
            self.__dict__["_lengths"] = cached
        return cached[1]

    def sequence(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]

    @staticmethod
    def join(parts: list["Encoded"]) -> "Encoded":
        """The parts one after another (ids, offsets and labels)."""
        starts = np.concatenate([[0], np.cumsum([len(part.ids) for part in parts])])
        return Encoded(np.concatenate([part.ids for part in parts]),
                       np.concatenate([[0]] + [part.offsets[1:] + start for part, start in zip(parts, starts)]),
                       np.concatenate([part.labels for part in parts]))

    def subset(self, index: np.ndarray) -> "Encoded":
        seqs = [self.sequence(i) for i in index]
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(s) for s in seqs])
        ids = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int32)
        return Encoded(ids.astype(np.int32), offsets, self.labels[index])


def default_cache_dir() -> Path:
    return Path(os.environ.get("PEFTLAB_CACHE") or Path.home() / ".cache" / "peftlab")


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies the tokenizer by what it does (its full serialized state), not by its name. The
    truncation and padding settings are left out: every call rewrites them (max_length is part of the
    cache key anyway), so including them made the key depend on what the tokenizer did last."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        state = json.dumps(state, sort_keys=True)
    else:
        state = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{type(tokenizer).__name__}\0{state}".encode()).hexdigest()


def _cache_key(tokenizer, texts: list[str], max_length: int) -> str:
    h = hashlib.sha256()
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(f"\0{max_length}\0{len(texts)}\0".encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:32]


def valid_text(text: str) -> str:
    """The text with lone surrogates (from undecodable bytes, or JSON such as "\\ud800") replaced by
    U+FFFD: tokenizers accept only valid Unicode."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape" if _escaped_bytes(text) else "replace").decode("utf-8", "replace")


def _escaped_bytes(text: str) -> bool:
    # Python keeps undecodable command-line bytes as U+DC80..U+DCFF ("surrogateescape")
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def _tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    ids, offsets = [], [0]
    for start in range(0, len(texts), 2048):  # chunks keep memory flat on big datasets
        enc = tokenizer([valid_text(t) for t in texts[start:start + 2048]], truncation=True, max_length=max_length,
                        return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        for seq in enc:
            ids.append(np.asarray(seq, dtype=np.int32))
            offsets.append(offsets[-1] + len(seq))
    return np.concatenate(ids), np.asarray(offsets, dtype=np.int64)


def tokenize_texts(tokenizer, texts: list[str], labels: np.ndarray, max_length: int) -> Encoded:
    """Token ids for texts, without the disk cache (one-off inputs such as a server's requests)."""
    labels = np.asarray(labels, dtype=np.int64)
    if not texts:
        return Encoded(np.zeros(0, np.int32), np.zeros(1, np.int64), labels)
    return Encoded(*_tokenize(tokenizer, texts, max_length), labels)


def encode(tokenizer, texts: list[str], labels: np.ndarray, max_length: int,
           cache_dir: str | Path | None = None) -> Encoded:
    """Token ids for texts, from the disk cache when the same tokenizer saw the same texts before."""
    labels = np.asarray(labels, dtype=np.int64)
    if not texts:
        return Encoded(np.zeros(0, np.int32), np.zeros(1, np.int64), labels)
    directory = Path(cache_dir) if cache_dir else default_cache_dir()
    path = directory / f"tok-{_cache_key(tokenizer, texts, max_length)}.npz"
    if path.exists():
        try:
            with np.load(path) as z:
                return Encoded(z["ids"], z["offsets"], labels)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is rebuilt below
    ids, offsets = _tokenize(tokenizer, texts, max_length)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, ids=ids, offsets=offsets)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old state or the whole file
    except OSError:
        # a read-only or full cache only costs speed; a half-written temporary is not left behind
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return Encoded(ids, offsets, labels)
