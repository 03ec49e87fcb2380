"""Stratified splits: carve a missing validation/test split out of train, and take small subsets.

Everything is driven by the seed, so the same config always gives the same rows. Returned indices are
sorted, so every split keeps the order of its source (easier to inspect; the trainer shuffles anyway).
Multi-label rows (a 0/1 matrix, one column per label) are stratified by their rarest label, so that
rare labels reach every split in proportion (`strata`).
"""
from __future__ import annotations

import math

import numpy as np

from peftlab.errors import UserError


def percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def strata(labels: np.ndarray, label_names: list[str]) -> tuple[np.ndarray, list[str]]:
    """The groups to stratify on, and their names. Single-label: the classes themselves. Multi-label
    (n, K) 0/1: each row's rarest label (by its count in these rows), or "no label"; a group of one row
    joins the largest group, since a stratified split needs two rows of each group."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        return labels, label_names
    counts = labels.sum(axis=0)
    rarity = np.where(labels > 0, counts[None, :], np.iinfo(np.int64).max)
    keys = np.where(labels.any(axis=1), rarity.argmin(axis=1), len(label_names)).astype(np.int64)
    names = [f"rarest label {n}" for n in label_names] + ["no label"]
    sizes = np.bincount(keys, minlength=len(names))
    lonely = np.flatnonzero(sizes == 1)
    if len(lonely) and len(keys) > 1:
        keys[np.isin(keys, lonely)] = int(np.argmax(sizes))
    return keys, names


def carve(labels: np.ndarray, fraction: float, seed: int, *, purpose: str, where: str,
          label_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into (kept, carved), `fraction` of them carved, every class in the same share.

    `purpose` is "validation" or "test": it names the split in error messages and the setting to change.
    Stratifying needs every class on both sides, so tiny classes or tiny fractions are errors, explained.
    Multi-label rows are stratified by their rarest label (`strata`).
    """
    labels, label_names = strata(labels, label_names)
    n = len(labels)
    counts = np.bincount(labels, minlength=len(label_names))
    present = np.flatnonzero(counts)
    lonely = [label_names[c] for c in present if counts[c] < 2]
    if lonely:
        raise UserError(
            f"{where}: class {lonely[0]!r} has only 1 row, too few to carve a stratified {percent(fraction)} "
            f"{purpose} split (every class needs at least 2 rows); add rows of that class, remove it, "
            f"or supply a {purpose} file")
    n_carved = math.ceil(fraction * n)  # the sizes sklearn uses for a float test_size
    if n_carved < len(present):
        raise UserError(
            f"{where}: a {percent(fraction)} {purpose} split of {n} rows has {n_carved} rows, fewer than the "
            f"{len(present)} classes, so it cannot hold every class; raise data.{purpose}_fraction or add rows")
    if n - n_carved < len(present):
        raise UserError(
            f"{where}: a {percent(fraction)} {purpose} split of {n} rows leaves {n - n_carved} rows, fewer than "
            f"the {len(present)} classes; lower data.{purpose}_fraction or add rows")
    from sklearn.model_selection import train_test_split  # imported here: it costs ~2 s at startup

    kept, carved = train_test_split(np.arange(n), test_size=fraction, random_state=seed, stratify=labels)
    return np.sort(kept), np.sort(carved)


def subsample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of a stratified subset of `n` rows (all rows when n is not smaller).

    Unlike carve this never fails: it is for quick runs, where a rough subset beats an error.
    Every class keeps at least one row when n allows it. Multi-label rows: by their rarest label.
    """
    labels = np.asarray(labels)
    if labels.ndim == 2:
        labels = strata(labels, [str(i) for i in range(labels.shape[1])])[0]
    if n >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    quota = _allocate(counts, n)
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picks))


def _allocate(counts: np.ndarray, n: int) -> np.ndarray:
    """Rows per class for a subset of n: one for each class first (the largest, when n is too small for all),
    then the rest in proportion to what each class has left, rounded by largest remainder."""
    quota = np.zeros(len(counts), dtype=np.int64)
    quota[np.argsort(-counts, kind="stable")[: min(n, len(counts))]] = 1
    rest = n - quota.sum()
    exact = (counts - quota) * rest / (counts - quota).sum()
    share = np.floor(exact).astype(np.int64)
    # The rows lost to rounding go to the largest remainders (ties: the earlier class, for determinism).
    share[np.argsort(-(exact - share), kind="stable")[: rest - share.sum()]] += 1
    return quota + share


# --- few labelled rows (docs/few-shot.md) ------------------------------------------------------------
def selection_plan(n_validation: int, min_rows: int, validation_is_train: bool = False) -> dict:
    """How the run picks its best epoch: by validation (RULE of peftlab.runs.select is the trainer's), or,
    when validation is too small to tell epochs apart or is the training rows themselves, the last epoch
    (a fixed budget of train.epochs)."""
    if validation_is_train:
        return {"rule": "last epoch", "validation_rows": 0,
                "reason": "no validation split, and one carved from train would be too small to choose an epoch: "
                          "not carved, every labelled row trains (validation figures are of the training rows)"}
    if n_validation < min_rows:
        return {"rule": "last epoch", "validation_rows": n_validation,
                "reason": f"validation has {n_validation} rows, fewer than data.min_validation_rows={min_rows}: "
                          f"too few to choose an epoch"}
    return {"rule": None, "validation_rows": n_validation, "reason": None}


def capped_batch_size(n_rows: int, batch_size: int, accumulation: int, min_steps: int) -> int:
    """The batch size, lowered where needed so that an epoch of `n_rows` has at least `min_steps`
    optimizer steps (never below 1: a handful of rows then gives one step per row group)."""
    if math.ceil(math.ceil(n_rows / batch_size) / accumulation) >= min_steps:
        return batch_size
    return max(1, min(batch_size, n_rows // (min_steps * accumulation)))


def check_not_empty(splits: dict, sources: dict) -> None:
    """Every split must keep a row: an emptied one (e.g. data.drop_duplicates_across_splits dropped
    every validation row, all also in train) is a user error, named in one line."""
    for split, rows in splits.items():
        if len(rows) == 0:
            raise UserError(f"data: the {split} split is empty ({sources.get(split, 'no rows')}); give it rows of "
                            f"its own (e.g. a {split} file with texts not in train), or leave "
                            f"data.drop_duplicates_across_splits off")
