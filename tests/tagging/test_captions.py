"""``tag`` on the local engine with a pipeline that captions images (image_captioner first):
image-only posts get a caption, every post gives one row, a resumed job never captions an
image again, and a captioner that cannot be loaded stops the job in one line, leaving no
job record behind."""
import json
import os
import shutil
from collections import Counter

import pytest
from typer.testing import CliRunner

from batch_support import write_jsonl
from caption_support import build_captioning_pipeline, count_generate, image_only_posts
from spacy_agban.tagging.local import run_local
from spacy_agban.tagging.posts import JOB_FILE, read_output

NAMES = ["102.jpg", "106.jpg", "130.jpg", "149.jpg", "102.jpg", "missing.jpg", "106.jpg"]


@pytest.fixture(scope="module")
def captioning_model(tmp_path_factory):
    return build_captioning_pipeline(tmp_path_factory.mktemp("captioning_pipeline"))


@pytest.fixture
def generated(monkeypatch, tmp_path):
    """The images each ImageCaptioner.generate call got; the caption store in tmp_path."""
    monkeypatch.setenv("SPACY_AGBAN_CACHE", str(tmp_path / "cache"))
    return count_generate(monkeypatch)


def posts_file(tmp_path):
    rows = image_only_posts(NAMES) + [{"id": "given", "text": "Kolo is here", "image": "130.jpg",
                                       "caption": "a dog playing on the grass"},
                                      {"id": "text", "text": "I love Paris"}]
    return write_jsonl(tmp_path / "posts.jsonl", rows)


def test_tag_captions_image_only_posts_and_resumes_without_captioning_again(captioning_model, generated,
                                                                           tmp_path) -> None:
    source = posts_file(tmp_path)

    class Interrupted(Exception):
        pass

    def stop(index):
        if index == 0:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_local(str(captioning_model), source, tmp_path / "out", part_size=4, batch_size=2, progress=False,
                  after_part=stop)
    first = sum(generated)
    assert first == 4  # part 0 (posts p0-p3): four distinct images
    generated.clear()
    result = run_local(str(captioning_model), source, tmp_path / "out", part_size=4, batch_size=2, progress=False)
    assert sum(generated) == 0, "the images of the rest were captioned in the first run or are the same images"
    rows = read_output(tmp_path / "out")
    ids = [r["id"] for r in rows]
    assert ids == [f"p{i}" for i in range(len(NAMES))] + ["given", "text"] and max(Counter(ids).values()) == 1
    out = {r["id"]: r for r in rows}
    for key in ("p0", "p1", "p2", "p3", "p4", "p6"):
        assert {u["source"] for u in out[key]["visual_units"]} == {"caption"}, key  # the image's text reached agban
        assert out[key]["error"] is None
    assert out["p5"]["error_kinds"] == ["image_missing"] and out["p5"]["visual_units"] == []
    assert [u["label"] for u in out["given"]["visual_units"]] == ["dog", "playing", "grass"]
    assert out["text"]["visual_units"] == [] and out["text"]["error"] is None
    assert result["counts"]["caption:cached"] == 2 and "captions of images: 2 read from the caption store" in result["summary"]


def test_tag_local_and_a_second_job_read_the_store(captioning_model, generated, tmp_path) -> None:
    source = posts_file(tmp_path)
    first = run_local(str(captioning_model), source, tmp_path / "a", batch_size=3, progress=False)
    assert sum(generated) == 4 and first["counts"]["caption:generated"] == 4
    assert first["counts"]["caption:cached"] == 2  # 102.jpg and 106.jpg again, in later batches
    generated.clear()
    second = run_local(str(captioning_model), source, tmp_path / "b", batch_size=3, progress=False)
    assert sum(generated) == 0 and second["counts"]["caption:cached"] == 6
    assert read_output(tmp_path / "a") == read_output(tmp_path / "b")


def test_a_captioner_that_cannot_load_stops_tag_in_one_line_and_leaves_no_record(captioning_model, tmp_path,
                                                                               monkeypatch) -> None:
    from spacy_agban.cli import app

    monkeypatch.setenv("SPACY_AGBAN_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "model"
    shutil.copytree(captioning_model, broken)
    config = (broken / "config.cfg").read_text()
    folder = json.dumps(str(captioning_model.parent / "tiny-blip"))
    assert folder in config
    (broken / "config.cfg").write_text(config.replace(folder, '"someone/captioner-not-downloaded"'))
    result = CliRunner().invoke(app, ["tag", str(broken), str(posts_file(tmp_path)), str(tmp_path / "out")])
    assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit)
    assert "not in the Hugging Face cache" in result.output and "allow_download = true" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out" / JOB_FILE).exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_spacy_evaluate_captions_the_images_of_its_data(captioning_model, tmp_path) -> None:
    """``spacy evaluate`` makes each predicted doc from the text; the pipeline still sees the
    image (the corpus copies it over), and its captioner captions it."""
    import subprocess
    import sys

    import spacy
    from spacy.tokens import DocBin

    from spacy_agban.units.caption_store import CaptionStore

    nlp = spacy.blank("en")
    docbin = DocBin(store_user_data=True)
    for text, image, entity in (("Kolo is here", "102.jpg", (0, 4, "PER")), ("I love Paris", "106.jpg", (7, 12, "LOC"))):
        doc = nlp.make_doc(text)
        doc.ents = [doc.char_span(*entity)]
        doc._.image = image
        docbin.add(doc)
    docbin.to_disk(tmp_path / "test.spacy")
    env = {**os.environ, "SPACY_AGBAN_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "spacy", "evaluate", str(captioning_model), str(tmp_path / "test.spacy")],
                          env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "NER F" in done.stdout or "ENTS_F" in done.stdout.upper()
    assert "MissingCaptionWarning" not in done.stderr
    assert CaptionStore(tmp_path / "cache" / "captions.sqlite").count() == 2


def test_the_caption_stage_counts_in_the_cluster_check() -> None:
    from spacy_agban.tagging.posts import InputError
    from spacy_agban.tagging.ray_engine import RayOptions, check_resources, needed_cpus

    class Cluster:
        def __init__(self, **resources):
            self.resources = resources

        def cluster_resources(self):
            return self.resources

    options = RayOptions(detect_actors=1, tag_actors=1, caption_actors=2, caption_cpus=0.5)
    assert needed_cpus(options, detect=False, caption=True) == 3 and needed_cpus(options) == 3
    check_resources(Cluster(CPU=3, GPU=1), options, 0.0, detect=False, caption_gpus=0.5)
    with pytest.raises(InputError, match="caption 2 x 0.5"):
        check_resources(Cluster(CPU=2.5, GPU=1), options, 0.0, detect=False, caption_gpus=0.5)
    with pytest.raises(InputError, match="--caption-gpus"):
        check_resources(Cluster(CPU=8, GPU=1), options, 1.0, detect=True, caption_gpus=0.5)
