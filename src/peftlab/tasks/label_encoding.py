"""Reading a label column into label names and ids, one encoding per task kind: one class per text
(encode_classes: ids 0..n-1) or a set of labels per text (encode_label_sets: a 0/1 row per text). `raw` is
data/sources.py's source as read: its .label_names (labels.json or the hub's names, or None), .where (split
-> how to name it in a message) and .label_column."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from peftlab.errors import UserError


def label_set(value, separator: str, names: list[str] | None, where: str, row: int) -> list[str]:
    """One multi-label cell as label names: a list (JSON Lines, Parquet), a JSON list in a string, or a
    string split on `separator`; empty or missing is the empty set. Integers with names (labels.json)
    are ids."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                value = text.split(separator)
        else:
            value = text.split(separator)
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, (list, dict)) or item is None:
            raise UserError(f"{where}: row {row + 1} has label {item!r}; a multi-label cell is a list of label names "
                            f"or one string like 'a{separator}b'")
        if isinstance(item, float) and item.is_integer():
            item = int(item)
        if isinstance(item, int) and not isinstance(item, bool) and names is not None:
            if not 0 <= item < len(names):
                raise UserError(f"{where}: row {row + 1} has label id {item}, but labels.json names {len(names)} labels; "
                                "fix the ids or the names")
            item = names[item]
        name = str(item).strip()
        if name and name not in out:
            out.append(name)
    return out


def encode_label_sets(labels: dict[str, pd.Series], raw,
                       separator: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """Multi-label: label names (index = column) and a 0/1 matrix (rows, labels) per split. Names come
    from train (labels.json order when given, else sorted), never from evaluation splits."""
    sets = {s: [label_set(v, separator, raw.label_names, raw.where[s], i) for i, v in enumerate(series)]
            for s, series in labels.items()}
    seen = {n for row in sets["train"] for n in row}
    names = [n for n in raw.label_names if n in seen] if raw.label_names else sorted(seen)
    if len(names) < 2:
        raise UserError(f"{raw.where['train']}: {len(names)} distinct label(s) in column {raw.label_column!r} with "
                        f"data.multi_label=true; multi-label classification needs at least 2 labels: check "
                        f"data.label_column and data.label_separator ({separator!r})")
    index = {n: i for i, n in enumerate(names)}
    ids = {}
    for split, rows in sets.items():
        unseen = sorted({n for row in rows for n in row} - set(names))
        if unseen:
            shown = ", ".join(repr(v) for v in unseen[:5]) + (", ..." if len(unseen) > 5 else "")
            raise UserError(f"{raw.where[split]}: label(s) {shown} in column {raw.label_column!r} never occur in the "
                            "train split; remove those labels or add examples of them to train")
        matrix = np.zeros((len(rows), len(names)), dtype=np.int64)
        for i, row in enumerate(rows):
            matrix[i, [index[n] for n in row]] = 1
        ids[split] = matrix
    return names, ids


def int_ids(labels: pd.Series) -> np.ndarray | None:
    """Labels as int64 when they are whole numbers (1, 2.0), else None: they are names then."""
    if pd.api.types.is_bool_dtype(labels) or not pd.api.types.is_numeric_dtype(labels):
        return None
    values = labels.to_numpy(dtype=np.float64)
    if not np.all(np.mod(values, 1) == 0):
        return None
    return values.astype(np.int64)


def encode_classes(labels: dict[str, pd.Series], raw) -> tuple[list[str], dict[str, np.ndarray]]:
    """Label names (index = id) and the ids of every split. Names come from train, never from eval splits."""
    column, where = raw.label_column, raw.where
    train_ids = int_ids(labels["train"])
    if train_ids is not None and raw.label_names is not None:
        # Integer labels with names (labels.json, the hub's ClassLabel): the integers are the ids.
        if train_ids.min() < 0:
            raise UserError(f"{where['train']}: label {train_ids.min()} in column {column!r} is not a class id; "
                            "integer labels must be 0, 1, 2, ... (or use label names)")
        names = raw.label_names
        if train_ids.max() >= len(names):
            raise UserError(f"{where['train']}: label {train_ids.max()} has no name in the {len(names)} class names "
                            "given (labels.json or the dataset's features); fix the names or the labels")
        known = set(train_ids.tolist())
        ids, unseen = {"train": train_ids}, {}
        for split in [s for s in labels if s != "train"]:
            ids[split] = int_ids(labels[split])  # None (names where train has numbers): all unseen below
            found = set(labels[split].astype(str)) if ids[split] is None else set(ids[split].tolist())
            unseen[split] = sorted(found - known)
    elif train_ids is not None:
        # Unnamed integers: the values that occur, in numeric order, are the classes (gaps such as
        # {1, 5, 10} or negatives such as {-1, 1} make no phantom classes); each is named by its value.
        values = sorted(set(train_ids.tolist()))
        names, index = [str(v) for v in values], {v: i for i, v in enumerate(values)}
        ids, unseen = {}, {}
        for split, series in labels.items():
            ints = train_ids if split == "train" else int_ids(series)
            found = set(series.astype(str)) if ints is None else set(ints.tolist())
            unseen[split] = sorted(found - set(values), key=str)
            ids[split] = (np.array([index.get(v, -1) for v in ints.tolist()], dtype=np.int64) if ints is not None
                          else np.full(len(series), -1, dtype=np.int64))
        unseen.pop("train")
    else:
        # Names: their sorted order gives the ids, so the mapping does not depend on row order.
        as_text = {s: v.astype(str).to_numpy() for s, v in labels.items()}
        names = sorted(set(as_text["train"]))
        index = {n: i for i, n in enumerate(names)}
        unseen = {s: sorted(set(v) - set(names)) for s, v in as_text.items() if s != "train"}
        ids = {s: np.array([index.get(n, -1) for n in v], dtype=np.int64) for s, v in as_text.items()}

    for split, values in unseen.items():
        if values:
            shown = ", ".join(repr(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
            raise UserError(f"{where[split]}: label(s) {shown} in column {column!r} never occur in the train split; "
                            "remove those rows or add examples of them to train")
    classes = np.unique(ids["train"])
    if len(classes) < 2:
        raise UserError(f"{where['train']}: only one class ({names[classes[0]]!r}) in column {column!r}; "
                        "classification needs at least 2 classes: check data.label_column and the data")
    return names, ids
