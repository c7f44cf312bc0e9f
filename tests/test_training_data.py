"""training/data.py: every local layout loads to the same pairs; unfit and over-long pairs are dropped and counted."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import MULTI30K

from hf_weaknat import train_weaknat_tokenizer
from training import data
# Lines that trip naive readers: quotes (csv quoting), NA/null (pandas NA parsing), leading/trailing spaces
TRICKY = [("\"Zitat\" am Anfang", "\"Quote\" first"), ("NA", "null"), ("  Leerzeichen ", " spaces  "),
          ("Ein 'Apostroph'", "An 'apostrophe'")]


def sample_pairs(n=40):
    de = (MULTI30K / "valid.de").read_text(encoding="utf-8").splitlines()[:n]
    en = (MULTI30K / "valid.en").read_text(encoding="utf-8").splitlines()[:n]
    return list(zip(de, en)) + TRICKY


def write_layouts(root: Path, pairs) -> dict[str, Path]:
    """The same pairs as two-file, jsonl, tsv and parquet, one directory each (split name: train)."""
    layouts = {name: root / name for name in ("two_file", "jsonl", "tsv", "parquet")}
    for directory in layouts.values():
        directory.mkdir()
    (layouts["two_file"] / "train.de").write_text("".join(d + "\n" for d, _ in pairs), encoding="utf-8")
    (layouts["two_file"] / "train.en").write_text("".join(e + "\n" for _, e in pairs), encoding="utf-8")
    (layouts["jsonl"] / "train.jsonl").write_text(
        "".join(json.dumps({"translation": {"de": d, "en": e}}, ensure_ascii=False) + "\n" for d, e in pairs),
        encoding="utf-8")
    (layouts["tsv"] / "train.tsv").write_text("en\tde\n" + "".join(f"{e}\t{d}\n" for d, e in pairs), encoding="utf-8")
    table = pa.table({"translation": [{"de": d, "en": e} for d, e in pairs]})
    pq.write_table(table, layouts["parquet"] / "train.parquet")
    return layouts


def as_pairs(dataset):
    return [(row["source"], row["target"]) for row in dataset]


def test_every_local_layout_loads_the_same_pairs_in_both_directions(tmp_path):
    pairs = sample_pairs()
    for name, directory in write_layouts(tmp_path, pairs).items():
        de_en = data.load_split(str(directory), "train", "de", "en")
        assert as_pairs(de_en) == pairs, name
        en_de = data.load_split(str(directory), "train", "en", "de")
        assert as_pairs(en_de) == [(e, d) for d, e in pairs], name
        streamed = data.load_split(str(directory), "train", "de", "en", streaming=True)
        assert as_pairs(streamed) == pairs, name


def test_missing_split_is_none_and_misaligned_files_fail(tmp_path):
    (tmp_path / "train.de").write_text("a\nb\n")
    (tmp_path / "train.en").write_text("a\n")
    assert data.load_split(str(tmp_path), "test", "de", "en") is None
    with pytest.raises(data.DataError, match="train.de has 2 lines but .*train.en has 1"):  # not datasets' wrapper
        data.load_split(str(tmp_path), "train", "de", "en")


def test_bundled_corpus_loads_with_its_published_line_counts():
    for split, expected in (("train", 29000), ("valid", 1014), ("test", 1000)):
        assert len(data.load_split(str(MULTI30K), split, "de", "en")) == expected


def test_fit_rule_counts_adjacent_repeats():
    # ratio 2, source of 3 tokens -> 6 frames. A target of n tokens with r adjacent repeats needs n + r frames.
    assert data.fit_reason([5, 6, 7], [8, 9, 10, 11, 12, 13], 2, 10) == data.FITS  # 6 + 0 = 6
    assert data.fit_reason([5, 6, 7], [8, 8, 9, 9, 10], 2, 10) == data.TARGET_DOES_NOT_FIT  # 5 + 2 = 7
    assert data.fit_reason([5, 6, 7], [8, 8, 9, 10, 11], 2, 10) == data.FITS  # 5 + 1 = 6
    assert data.fit_reason([5, 6, 7], [8, 9, 10, 11, 12, 13, 14], 2, 10) == data.TARGET_DOES_NOT_FIT
    assert data.fit_reason(list(range(11)), [8], 2, 10) == data.SOURCE_TOO_LONG


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    lines = (MULTI30K / "train.de").read_text(encoding="utf-8").splitlines()[:1500]
    lines += (MULTI30K / "train.en").read_text(encoding="utf-8").splitlines()[:1500]
    return train_weaknat_tokenizer(lines, vocab_size=400, num_threads=2)


def test_unfit_and_overlong_pairs_are_dropped_and_counted(tmp_path, tokenizer):
    ordinary = sample_pairs(20)
    long_source = " ".join(["Hund"] * 40)  # far more than 12 tokens
    pairs = ordinary + [(long_source, "A dog."), ("Ja.", "Yes, " + "yes " * 30 + "indeed.")]
    directory = write_layouts(tmp_path, pairs)["jsonl"]
    tokenized = data.tokenize_pairs(data.load_split(str(directory), "train", "de", "en"), tokenizer, 2, 12)
    expected = [data.fit_reason(s, t, 2, 12) for s, t in zip(tokenized["input_ids"], tokenized["labels"])]
    assert expected[-2:] == [data.SOURCE_TOO_LONG, data.TARGET_DOES_NOT_FIT]
    kept, counts = data.drop_unfit_pairs(tokenized)
    assert counts == {"kept": expected.count(data.FITS), "source_too_long": expected.count(data.SOURCE_TOO_LONG),
                      "target_does_not_fit": expected.count(data.TARGET_DOES_NOT_FIT), "empty_source": 0,
                      "invalid_utf8": 0, "length_offset_out_of_range": 0}
    assert len(kept) == counts["kept"] and set(kept["fit"]) == {data.FITS}
    assert all(len(t) + sum(a == b for a, b in zip(t, t[1:])) <= 2 * len(s) for s, t in zip(kept["input_ids"],
                                                                                              kept["labels"]))
    # a stream gives the same counts, counted while it is read
    stream_filter = data.StreamFilterCounts()
    stream = data.tokenize_pairs(data.load_split(str(directory), "train", "de", "en", streaming=True), tokenizer, 2, 12)
    assert len(list(stream_filter.apply(stream))) == counts["kept"]
    assert stream_filter.counts == counts


def test_evaluation_sets_keep_text_and_truncate_instead_of_dropping(tmp_path, tokenizer):
    pairs = [(" ".join(["Hund"] * 40), "A dog.")] + sample_pairs(5)
    directory = write_layouts(tmp_path, pairs)["two_file"]
    tokenized = data.tokenize_pairs(data.load_split(str(directory), "train", "de", "en"), tokenizer, 2, 12,
                                    for_evaluation=True)
    assert len(tokenized) == len(pairs) and tokenized["target"] == [e for _, e in pairs]
    assert max(len(ids) for ids in tokenized["input_ids"]) == 12


def test_tokenizer_training_text_reads_both_sides(tmp_path):
    directory = write_layouts(tmp_path, sample_pairs(3))["two_file"]
    lines = list(data.training_texts(data.load_split(str(directory), "train", "de", "en")))
    streamed = list(data.training_texts(data.load_split(str(directory), "train", "de", "en", streaming=True)))
    both_sides = [d for d, _ in sample_pairs(3)] + [e for _, e in sample_pairs(3)]
    assert sorted(lines) == sorted(streamed) == sorted(both_sides)


def test_tokenization_is_cached_per_tokenizer_and_ratio(tokenizer):
    pairs = data.load_split(str(MULTI30K), "valid", "de", "en").select(range(50))
    first = data.tokenize_pairs(pairs, tokenizer, 3, 64)
    assert first.cache_files and data.tokenize_pairs(pairs, tokenizer, 3, 64).cache_files == first.cache_files
    assert data.tokenize_pairs(pairs, tokenizer, 2, 64).cache_files != first.cache_files
    assert first.column_names == ["input_ids", "labels", "length", "fit"]
