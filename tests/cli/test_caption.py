"""``python -m spacy_agban caption``: a DocBin's images captioned by the configured captioner,
given captions kept unless --overwrite, bad input refused in one line."""
import pytest
import spacy
from spacy.tokens import DocBin
from typer.testing import CliRunner

from caption_support import copy_images, save_tiny_blip
from spacy_agban.cli import app


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption_cli")
    model, images = save_tiny_blip(root / "tiny-blip"), copy_images(root / "images")
    nlp = spacy.blank("en")
    docbin = DocBin(store_user_data=True)
    for text, image, caption in (("Kolo is here", "102.jpg", None), ("I love Paris", "106.jpg", "alt text"),
                                 ("Gone", "missing.jpg", None), ("No image", None, None)):
        doc = nlp.make_doc(text)
        doc._.image, doc._.image_caption = image, caption
        docbin.add(doc)
    docbin.to_disk(root / "train.spacy")
    return root, model, images


def run(*args):
    return CliRunner().invoke(app, ["caption", *[str(a) for a in args]])


def read(path):
    return list(DocBin(store_user_data=True).from_disk(path).get_docs(spacy.blank("en").vocab))


def test_caption_command_writes_captions_and_keeps_given_ones(corpus, tmp_path) -> None:
    root, model, images = corpus
    common = ["--model", model, "--image-root", images, "--store", tmp_path / "c.sqlite", "--num-beams", 1,
              "--max-new-tokens", 6]
    result = run(root / "train.spacy", tmp_path / "out.spacy", *common)
    assert result.exit_code == 0, result.output
    docs = read(tmp_path / "out.spacy")
    assert docs[0]._.image_caption and docs[0]._.image_caption_source == {"origin": "generated", "model": str(model)}
    assert docs[1]._.image_caption == "alt text" and docs[1]._.image_caption_source == {"origin": "given"}
    assert docs[2]._.image_caption is None and docs[2]._.image_caption_source["origin"] == "failed"
    assert docs[3]._.image_caption_source is None
    assert "4 docs: 1 captioned" in result.output and "1 kept their caption, 1 failed" in result.output
    assert "missing.jpg" in result.output
    overwritten = run(root / "train.spacy", tmp_path / "all.spacy", *common, "--overwrite")
    assert overwritten.exit_code == 0, overwritten.output
    docs = read(tmp_path / "all.spacy")
    assert docs[1]._.image_caption not in (None, "alt text") and docs[1]._.image_caption_source["origin"] == "generated"
    assert "1 images generated, 1 read from the caption store" in overwritten.output  # 102.jpg: stored


@pytest.mark.parametrize("args,expected", [
    (["same"], "must differ from INPUT"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--model", "someone/not-downloaded"], "not in the Hugging Face cache"),
])
def test_caption_command_refuses_bad_arguments_in_one_line(corpus, tmp_path, args, expected) -> None:
    root, model, images = corpus
    output = root / "train.spacy" if args == ["same"] else tmp_path / "out.spacy"
    extra = [] if args == ["same"] else args
    result = run(root / "train.spacy", output, "--store", tmp_path / "c.sqlite", *extra)
    assert result.exit_code == 1 and expected in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
