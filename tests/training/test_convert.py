"""Conversion of the shipped Twitter-2015 files and of malformed input."""

import pytest
from spacy.tokens import DocBin
from spacy.vocab import Vocab
from typer.testing import CliRunner

from conftest import ASSETS
from spacy_agban.cli import app
from spacy_agban.training.convert import ConversionError, convert_file, read_captions, read_conll

# README of the data: tweets, B- tags, entities with conlleval's orphan I- rule
EXPECTED = {
    "train": (4000, 6166, 6352, {"PER": 2285, "LOC": 2135, "ORG": 957, "MISC": 975}),
    "valid": (1000, 1541, 1594, None),
    "test": (3257, 5072, 5207, None),
}


@pytest.fixture(scope="module")
def captions():
    return read_captions(ASSETS / "captions_blip2.txt")


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_counts_on_the_shipped_data(tmp_path, captions, split):
    tweets, b_tags, entities, per_type = EXPECTED[split]
    stats = convert_file(ASSETS / f"{split}.txt", tmp_path / "out.spacy", captions, {"OTHER": "MISC"})
    assert stats.tweets == tweets
    assert sum(stats.entities.values()) == entities
    assert sum(stats.entities.values()) - stats.orphan_inside == b_tags
    assert stats.with_caption == tweets
    if per_type:
        assert dict(stats.entities) == per_type
    docs = list(DocBin().from_disk(tmp_path / "out.spacy").get_docs(Vocab()))
    assert len(docs) == tweets
    assert docs[0]._.image.endswith(".jpg") and docs[0]._.image_caption


def test_captions_file_has_every_image(captions):
    assert len(captions) == 8288
    assert captions["108911.jpg"].startswith("the chicago bears")


def test_no_break_space_token_is_kept(tmp_path):
    tweets = list(read_conll(ASSETS / "valid.txt"))
    assert sum(len(t.words) for t in tweets) == 16178
    assert any("\xa0" in t.words for t in tweets)


@pytest.mark.parametrize(
    "content,line,reason",
    [
        ("IMGID:1\nhello\tO\nworld O\n", 3, "token<TAB>tag"),
        ("hello\tO\n", 1, "before any IMGID"),
        ("IMGID:1\nhello\tX-PER\n", 2, "is not O"),
        ("IMGID:\nhello\tO\n", 1, "without an image id"),
        ("IMGID:1\nhello\tO\tO\n", 2, "token<TAB>tag"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, content, line, reason):
    path = tmp_path / "bad.txt"
    path.write_text(content, encoding="utf8")
    with pytest.raises(ConversionError, match=f"bad.txt:{line}: .*{reason}"):
        list(read_conll(path))


def test_cli_reports_counts_and_errors(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "train.txt").write_text("IMGID:1\nI\tO\nParis\tB-LOC\n\nIMGID:2\nx\tI-OTHER\n", encoding="utf8")
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(tmp_path / "in"), str(tmp_path / "out"), "--splits", "train"])
    assert result.exit_code == 0, result.output
    assert "| train | 2 | 3 | 2 | 1 | 1 | 1 | 0 |" in result.output
    (tmp_path / "in" / "train.txt").write_text("IMGID:1\nbroken line\n", encoding="utf8")
    result = runner.invoke(app, ["convert", str(tmp_path / "in"), str(tmp_path / "out"), "--splits", "train"])
    assert result.exit_code == 1
    assert "train.txt:2" in result.output


@pytest.mark.parametrize(
    "args, expected",
    [
        (["convert", "IN", "OUT", "--splits", "train", "--captions", "/nonexistent.txt"], "/nonexistent.txt: No such file"),
        (["convert", "IN", "OUT", "--splits", "train", "--type-map", "BOGUS"], "type map entries look like OLD=NEW, got 'BOGUS'"),
        (["convert", "IN", "OUT", "--splits", "train", "--captions", "IN/train.txt"], "train.txt:1: expected '<id>.jpg :<caption>'"),
        (["vectors", "OUT", "--glove-txt", "/nonexistent.txt"], "/nonexistent.txt: No such file"),
        (["detect", "/nonexistent_dir", "OUT/s.sqlite"], "image folder /nonexistent_dir does not exist"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_1(tmp_path, args, expected):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "train.txt").write_text("IMGID:1\nParis\tB-LOC\n", encoding="utf8")
    args = [a.replace("IN", str(tmp_path / "in")).replace("OUT", str(tmp_path / "out")) for a in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert isinstance(result.exception, SystemExit)  # exited, did not crash
    assert not (tmp_path / "out" / "s.sqlite").exists()
