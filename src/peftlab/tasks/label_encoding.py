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
    check_names(names, raw.where["train"])
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


def check_names(names: list[str], where: str, what: str = "label") -> None:
    """Label names that can be told apart: none blank, none twice, and no two that differ only in case
    ("Sport" and "sport" are one label written two ways, or two labels that need better names)."""
    blank = [i for i, n in enumerate(names) if not str(n).strip()]
    if blank:
        raise UserError(f"{where}: {what} {blank[0] + 1} of {len(names)} is blank; every {what} needs a name")
    seen: dict[str, str] = {}
    for name in names:
        key = str(name).strip().casefold()
        if key in seen:
            how = "twice" if seen[key] == name else f"as {seen[key]!r} and {name!r}, which differ only in case"
            raise UserError(f"{where}: {what} {name!r} is named {how}; give each {what} one name, written one way")
        seen[key] = name


def _split_values(series: pd.Series, where: str, column: str) -> tuple[np.ndarray | None, list[str]]:
    """One split's labels as (int64 ids when they are whole numbers else None, their names as written:
    whole numbers as "1", text stripped of surrounding whitespace). A column that mixes numbers and text,
    or holds lists, cannot be one class per text: one line."""
    ints = int_ids(series)
    if ints is not None:
        return ints, [str(v) for v in ints.tolist()]
    values = series.tolist()
    kinds = {"number" if isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_)) else
             "list" if isinstance(v, (list, tuple, dict, np.ndarray)) else "text" for v in values}
    if "list" in kinds:
        row = next(i for i, v in enumerate(values) if isinstance(v, (list, tuple, dict, np.ndarray)))
        raise UserError(f"{where}: row {row + 1} has label {_shown(values[row])} in column {column!r}, a list; one "
                        f"class per text needs one label (several labels per text: data.multi_label=true)")
    if kinds == {"number", "text"}:
        number = next(v for v in values if not isinstance(v, str))
        text = next(v for v in values if isinstance(v, str))
        raise UserError(f"{where}: column {column!r} mixes numbers ({number!r}) and text ({text!r}); write every "
                        f"label the same way (all names, or all class ids)")
    if kinds == {"number"}:  # whole numbers in an object column (JSON Lines with some null-free mix of types)
        as_numbers = int_ids(pd.Series(values, dtype=np.float64))
        if as_numbers is not None:
            return as_numbers, [str(v) for v in as_numbers.tolist()]
    return None, [str(v).strip() for v in values]


def _shown(value) -> str:
    text = repr(value.tolist() if isinstance(value, np.ndarray) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def int_ids(labels: pd.Series) -> np.ndarray | None:
    """Labels as int64 when they are whole numbers (1, 2.0), else None: they are names then."""
    if pd.api.types.is_bool_dtype(labels) or not pd.api.types.is_numeric_dtype(labels):
        return None
    values = labels.to_numpy(dtype=np.float64)
    if not np.all(np.mod(values, 1) == 0):
        return None
    return values.astype(np.int64)


def encode_classes(labels: dict[str, pd.Series], raw) -> tuple[list[str], dict[str, np.ndarray]]:
    """Label names (index = id) and the ids of every split. Names come from train, never from eval splits.

    A label is what is written, compared as text: 1, 1.0 and "1" are one label wherever they occur (a CSV
    reads numbers, a JSON file may quote them), and surrounding whitespace is not part of a name. Integer
    labels are class ids into labels.json (or the hub's names) when there are names; else the values that
    occur are the classes, each named by its value. Two names that differ only in case are refused."""
    column, where = raw.label_column, raw.where
    read = {s: _split_values(series, where[s], column) for s, series in labels.items()}
    train_ids, train_names = read["train"]
    if train_ids is not None and raw.label_names is not None:
        # Integer labels with names (labels.json, the hub's ClassLabel): the integers are the ids.
        if train_ids.min() < 0:
            raise UserError(f"{where['train']}: label {train_ids.min()} in column {column!r} is not a class id; "
                            "integer labels must be 0, 1, 2, ... (or use label names)")
        names = raw.label_names
        if train_ids.max() >= len(names):
            raise UserError(f"{where['train']}: label {train_ids.max()} has no name in the {len(names)} class names "
                            "given (labels.json or the dataset's features); fix the names or the labels")
        # another split may give the ids, or the names themselves
        index = {**{n: i for i, n in enumerate(names)}, **{str(i): i for i in sorted(set(train_ids.tolist()))}}
    elif train_ids is not None:
        # Unnamed integers: the values that occur, in numeric order, are the classes (gaps such as
        # {1, 5, 10} or negatives such as {-1, 1} make no phantom classes); each is named by its value.
        names = [str(v) for v in sorted(set(train_ids.tolist()))]
        index = {n: i for i, n in enumerate(names)}
    else:
        # Names: their sorted order gives the ids, so the mapping does not depend on row order.
        names = sorted(set(train_names))
        check_names(names, where["train"])
        index = {n: i for i, n in enumerate(names)}
    ids = {}
    for split, (numbers, written) in read.items():
        ids[split] = np.array([index.get(n, -1) for n in written], dtype=np.int64)
        unseen = sorted({n for n, i in zip(written, ids[split]) if i < 0}, key=int if numbers is not None else str)
        if unseen:  # as written: numbers bare, names quoted
            shown = ", ".join(v if numbers is not None else repr(v) for v in unseen[:5]) + (", ..." if len(unseen) > 5 else "")
            folded = {n.casefold(): n for n in index}
            near = next((f" (train has {folded[v.casefold()]!r}: write it one way)" for v in unseen
                         if v.casefold() in folded), "")
            raise UserError(f"{where[split]}: label(s) {shown} in column {column!r} never occur in the train split"
                            f"{near}; remove those rows or add examples of them to train")
    classes = np.unique(ids["train"])
    if len(classes) < 2:
        raise UserError(f"{where['train']}: only one class ({names[classes[0]]!r}) in column {column!r}; "
                        "classification needs at least 2 classes: check data.label_column and the data")
    return names, ids
