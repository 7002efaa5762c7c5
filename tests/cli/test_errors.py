"""Every command checks its arguments and inputs first: a bad one gives one line that
says what is wrong and exit status 1, never a traceback, and an empty input is an
error unless a flag allows it."""
import json
from pathlib import Path
from typing import List

import pytest
from typer.testing import CliRunner

from spacy_agban.cli import app


def fails_in_one_line(args: List[str], *expected: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    # an uncaught exception also exits 1 under CliRunner, with the exception kept
    assert type(result.exception) is SystemExit, result.output
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """Enough of a pipeline folder for the checks that run before it is loaded."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.cfg").write_text("")
    return folder


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "posts.jsonl"
    path.write_text(json.dumps({"id": 1, "text": "Obama"}) + "\n")
    return path


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\r\n"])
def test_tag_on_an_empty_jsonl_is_an_error_unless_allowed(model, tmp_path, content) -> None:
    source = tmp_path / "empty.jsonl"
    source.write_bytes(content)
    fails_in_one_line(["tag", model, source, tmp_path / "out"], "holds no posts", "--allow-empty")
    assert not (tmp_path / "out").exists()


def test_tag_on_a_parquet_without_rows_or_corrupt(model, tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}),
                   tmp_path / "none.parquet")
    fails_in_one_line(["tag", model, tmp_path / "none.parquet", tmp_path / "out"], "holds no posts")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    fails_in_one_line(["tag", model, tmp_path / "bad.parquet", tmp_path / "out"], "cannot read", "bad.parquet")
    pq.write_table(pa.table({"pid": ["1"], "text": ["x"]}), tmp_path / "noid.parquet")
    fails_in_one_line(["tag", model, tmp_path / "noid.parquet", tmp_path / "out"], "no column 'id'")


@pytest.mark.parametrize("option, value, expected", [
    ("--output-format", "csv", "--output-format must be one of parquet, jsonl"),
    ("--part-size", "0", "--part-size must be at least 1"),
    ("--batch-size", "0", "--batch-size must be at least 1"),
    ("--batch-size", "-3", "--batch-size must be at least 1"),
    ("--engine", "spark", "--engine must be one of"),
    ("--detect-resource", "detect_node=0", "expected NAME=AMOUNT with AMOUNT > 0"),
    ("--detect-resource", "detect_node=lots", "expected NAME=AMOUNT"),
    ("--tag-cpus", "0", "--tag-cpus must be more than 0"),
    ("--precision", "fp16", "--precision takes fp32, bf16, int8"),
    ("--precision", "bf16", "has none"),  # the fixture's pipeline has no transformer
])
def test_tag_arguments_are_checked_first(model, jsonl, tmp_path, option, value, expected) -> None:
    fails_in_one_line(["tag", model, jsonl, tmp_path / "out", option, value], expected)
    assert not (tmp_path / "out").exists()


def test_tag_without_a_pipeline(tmp_path, jsonl) -> None:
    fails_in_one_line(["tag", tmp_path / "nothing", jsonl, tmp_path / "out"], "not a saved pipeline")


def test_detect_on_a_garbage_docbin_or_a_folder_as_store(tmp_path) -> None:
    (tmp_path / "train.spacy").write_bytes(b"\x00garbage, not msgpack" * 10)
    fails_in_one_line(["detect", tmp_path / "train.spacy", tmp_path / "f.sqlite"],
                      "cannot read", "as a DocBin")
    (tmp_path / "store").mkdir()
    (tmp_path / "images").mkdir()
    fails_in_one_line(["detect", tmp_path / "images", tmp_path / "store"], "is a folder")
    fails_in_one_line(["detect", tmp_path / "images", tmp_path / "f.sqlite", "--detector", "yolo"],
                      "--detector must be one of")
    fails_in_one_line(["detect", tmp_path / "images", tmp_path / "f.sqlite", "--top-k", "0"],
                      "--top-k must be at least 1")
    assert not (tmp_path / "f.sqlite").exists()


def test_detector_errors_add_the_offline_hint_only_for_downloads() -> None:
    import urllib.error

    from spacy_agban.cli.detect import detector_error_message

    tampered = detector_error_message("mobilenet", ValueError("refusing detector weights x.pth: its sha256 ..."))
    assert "refusing" in tampered and "internet" not in tampered
    offline = detector_error_message("mobilenet", urllib.error.URLError("Name or service not known"))
    assert "Without internet, pass --weights" in offline


def test_evaluate_checks_model_data_and_output_first(tmp_path) -> None:
    from spacy.tokens import DocBin

    import spacy

    fails_in_one_line(["evaluate", tmp_path / "no-model", tmp_path / "x.spacy"], "pipeline", "not found")
    (tmp_path / "garbage.spacy").write_bytes(b"\x00garbage" * 20)
    fails_in_one_line(["evaluate", tmp_path, tmp_path / "garbage.spacy"], "cannot read", "as a DocBin")
    DocBin(docs=[spacy.blank("en")("Obama")]).to_disk(tmp_path / "dev.spacy")
    fails_in_one_line(["evaluate", tmp_path, tmp_path / "dev.spacy", "--output", tmp_path / "missing" / "x.json"],
                      "folder of --output", "does not exist")
    fails_in_one_line(["evaluate", tmp_path, tmp_path / "dev.spacy"], "cannot load the pipeline")
    fails_in_one_line(["evaluate", tmp_path, tmp_path / "dev.spacy", "--precision", "fp16"], "--precision takes")
    fails_in_one_line(["evaluate", tmp_path, tmp_path / "dev.spacy", "--precision", "bf16", "--int8"], "--precision takes")


def test_features_import_of_crafted_datasets(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    fails_in_one_line(["features", "import", tmp_path / "none", tmp_path / "s.sqlite"], "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails_in_one_line(["features", "import", empty, tmp_path / "s.sqlite"], "holds no features", "--allow-empty")
    bad_json = tmp_path / "bad_json"
    (bad_json / "signatures").mkdir(parents=True)
    (bad_json / "signatures" / "abc.json").write_text("{not json")
    fails_in_one_line(["features", "import", bad_json, tmp_path / "s.sqlite"], "cannot import", "bad_json")
    bad_rows = tmp_path / "bad_rows"
    (bad_rows / "sig=abc").mkdir(parents=True)
    pq.write_table(pa.table({"image_key": ["k"], "features": [b"\x00" * 12], "labels": [["a", "b"]],
                             "scores": [[0.5, 0.5]], "boxes": [[0.0] * 8]}),
                   bad_rows / "sig=abc" / "part-1.parquet")
    fails_in_one_line(["features", "import", bad_rows, tmp_path / "s.sqlite"], "cannot import")
    wrong_types = tmp_path / "wrong_types"
    (wrong_types / "sig=abc").mkdir(parents=True)
    pq.write_table(pa.table({"image_key": [1], "features": ["text"]}), wrong_types / "sig=abc" / "part-1.parquet")
    fails_in_one_line(["features", "import", wrong_types, tmp_path / "s.sqlite"], "cannot import")


def test_vectors_name_the_bad_line(tmp_path) -> None:
    (tmp_path / "empty.txt").write_text("")
    fails_in_one_line(["vectors", tmp_path / "out", "--glove-txt", tmp_path / "empty.txt"], "holds no vectors")
    (tmp_path / "text.txt").write_text("the 0.1 0.2\ncat 0.3 abc\n")
    fails_in_one_line(["vectors", tmp_path / "out", "--glove-txt", tmp_path / "text.txt"],
                      "text.txt:2", "'abc' is not a number")
    (tmp_path / "widths.txt").write_text("the 0.1 0.2\ncat 0.3 0.4 0.5\n")
    fails_in_one_line(["vectors", tmp_path / "out", "--glove-txt", tmp_path / "widths.txt"], "widths.txt:2", "3 values")
