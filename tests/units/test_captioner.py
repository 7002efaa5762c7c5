"""The ``image_captioner`` component on a tiny random BLIP saved to a folder: captions for
image-only docs, given captions kept, the source recorded, the store (no generation the
second time), no download without permission, bad images, ``n_process=2``, and the
warning of a pipeline that reads captions and is given images without them."""
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import spacy
from PIL import Image

from caption_support import GenerateCalls, captioner_config, copy_images, save_tiny_blip
from conftest import ents
from spacy_agban.detection.images import ImageWarning
from spacy_agban.units.caption_store import CaptionStore
from spacy_agban.units.captioner import ADD_STAGE, CaptionModelError, MissingCaptionWarning, load_image_to_text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioner")
    return save_tiny_blip(root / "tiny-blip"), copy_images(root / "images")


def captioning_nlp(model, store, images, **changes):
    nlp = spacy.blank("en")
    nlp.add_pipe("image_captioner", config=captioner_config(model, store, images, **changes))
    return nlp


def doc_with(nlp, text, image=None, caption=None):
    doc = nlp.make_doc(text)
    doc._.image = image
    doc._.image_caption = caption
    return doc


def test_captions_image_only_docs_keeps_given_ones_and_records_the_source(tiny, tmp_path) -> None:
    model, images = tiny
    nlp = captioning_nlp(model, tmp_path / "captions.sqlite", images)
    docs = [doc_with(nlp, "Obama in Paris", "102.jpg"), doc_with(nlp, "Kolo is here", "106.jpg", "my own alt text"),
            doc_with(nlp, "Text only"), doc_with(nlp, "Alt text, no image", caption="a dog")]
    out = list(nlp.pipe(docs, batch_size=3))
    assert isinstance(out[0]._.image_caption, str) and out[0]._.image_caption
    assert out[0]._.image_caption_source == {"origin": "generated", "model": str(model)}
    assert out[1]._.image_caption == "my own alt text" and out[1]._.image_caption_source == {"origin": "given"}
    assert out[2]._.image_caption is None and out[2]._.image_caption_source is None
    assert out[3]._.image_caption == "a dog" and out[3]._.image_caption_source == {"origin": "given"}
    # nlp(doc) goes the same way, and --overwrite-style config replaces a given caption
    assert nlp(doc_with(nlp, "again", "102.jpg"))._.image_caption == out[0]._.image_caption
    overwrite = captioning_nlp(model, tmp_path / "captions.sqlite", images, overwrite=True)
    doc = overwrite(doc_with(overwrite, "Kolo", "102.jpg", "my own alt text"))
    assert doc._.image_caption == out[0]._.image_caption and doc._.image_caption_source["origin"] == "generated"


def test_a_second_run_reads_the_store_and_generates_nothing(tiny, tmp_path) -> None:
    model, images = tiny
    store = tmp_path / "captions.sqlite"
    first = captioning_nlp(model, store, images)
    calls = GenerateCalls(first.get_pipe("image_captioner"))
    names = ["102.jpg", "106.jpg", "113.jpg", "102.jpg", "130.jpg"]
    captions = [d._.image_caption for d in first.pipe([doc_with(first, f"post {i}", n) for i, n in enumerate(names)])]
    assert sum(calls.images) == 4 and calls.calls == 2  # 4 distinct images, batch_size 2
    assert CaptionStore(store).count() == 4
    # a new process would load the pipeline again: a new component, the same store
    second = captioning_nlp(model, store, images)
    again = GenerateCalls(second.get_pipe("image_captioner"))
    docs = list(second.pipe([doc_with(second, f"post {i}", n) for i, n in enumerate(names)]))
    assert again.calls == 0
    assert [d._.image_caption for d in docs] == captions
    assert all(d._.image_caption_source["origin"] == "generated" for d in docs)
    # other generation settings are another captioner: its captions are not reused
    other = captioning_nlp(model, store, images, generation={"max_new_tokens": 3, "num_beams": 1})
    changed = GenerateCalls(other.get_pipe("image_captioner"))
    other(doc_with(other, "post", "102.jpg"))
    assert changed.calls == 1


def test_without_the_store_captions_are_kept_for_the_process_only(tiny, tmp_path) -> None:
    model, images = tiny
    nlp = captioning_nlp(model, tmp_path / "unused.sqlite", images, cache=False)
    calls = GenerateCalls(nlp.get_pipe("image_captioner"))
    nlp(doc_with(nlp, "a", "102.jpg"))
    nlp(doc_with(nlp, "b", "102.jpg"))
    assert calls.calls == 1 and not (tmp_path / "unused.sqlite").exists()


def test_a_model_not_in_the_cache_is_not_downloaded_without_permission(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants as hub
    import requests as http
    import transformers.utils.hub as transformers_hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    # as online as it gets here: every request the Hub client would send is recorded
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(transformers_hub, "_is_offline_mode", False)
    requests = []

    def no_network(self, method, url, *args, **kwargs):
        requests.append(url)
        raise http.ConnectionError("no network in the tests")

    monkeypatch.setattr(http.Session, "request", no_network)
    with pytest.raises(CaptionModelError) as info:
        load_image_to_text("someone/captioner-not-here", allow_download=False)
    message = str(info.value)
    assert requests == []
    assert "not in the Hugging Face cache" in message and "allow_download = true" in message
    assert "huggingface-cli download someone/captioner-not-here" in message and "\n" not in message
    with pytest.raises(CaptionModelError, match="cannot download the image-to-text model"):
        load_image_to_text("someone/captioner-not-here", allow_download=True)
    assert requests, "allowed, the model is asked for"
    with pytest.raises(CaptionModelError, match="folder .*not found"):
        load_image_to_text(str(tmp_path / "no" / "such-folder"))


def test_a_broken_huge_or_missing_image_costs_its_doc_the_caption_only(tiny, tmp_path) -> None:
    model, images = tiny
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    Image.new("1", (9000, 8000)).save(images / "huge.png")  # 72M pixels, over the 64M limit
    nlp = captioning_nlp(model, tmp_path / "captions.sqlite", images)
    names = ["102.jpg", "broken.jpg", "huge.png", "missing.jpg", "106.jpg"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = list(nlp.pipe([doc_with(nlp, f"post {i}", n) for i, n in enumerate(names)]))
    said = " ".join(str(w.message) for w in caught if issubclass(w.category, ImageWarning))
    for name in ("broken.jpg", "huge.png", "missing.jpg"):
        assert name in said
    assert [bool(d._.image_caption) for d in docs] == [True, False, False, False, True]
    assert [d._.image_caption_source["origin"] for d in docs] == ["generated", "failed", "failed", "failed", "generated"]
    assert "pixels" in docs[2]._.image_caption_source["reason"]


def test_saved_pipeline_keeps_the_config_not_the_weights(tiny, tmp_path) -> None:
    model, images = tiny
    nlp = captioning_nlp(model, tmp_path / "captions.sqlite", images)
    path = tmp_path / "pipeline"
    nlp.to_disk(path)
    saved = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert saved < 100_000, "the captioner's weights must not be copied into the pipeline"
    loaded = spacy.load(path)
    assert loaded.config["components"]["image_captioner"]["model"] == str(model)
    assert loaded(doc_with(loaded, "x", "130.jpg"))._.image_caption == nlp(doc_with(nlp, "x", "130.jpg"))._.image_caption


def test_an_unknown_generation_setting_fails_at_load(tiny, tmp_path) -> None:
    model, images = tiny
    with pytest.raises(ValueError, match="max_new_tokenz"):
        captioning_nlp(model, tmp_path / "c.sqlite", images, generation={"max_new_tokenz": 5})


def test_agban_warns_once_per_call_about_images_without_captions(caption_pipeline, tiny, tmp_path) -> None:
    trained, path = caption_pipeline
    nlp = spacy.load(path)
    docs = [doc_with(nlp, "Kolo is here", "102.jpg"), doc_with(nlp, "I love Paris", "106.jpg"),
            doc_with(nlp, "Kolo is here", caption="a dog playing on the grass"), doc_with(nlp, "Text only")]
    with pytest.warns(MissingCaptionWarning) as caught:
        list(nlp.pipe(docs, batch_size=1))
    messages = [str(w.message) for w in caught if issubclass(w.category, MissingCaptionWarning)]
    assert len(messages) == 1 and messages[0].startswith("2 doc(s)") and ADD_STAGE in messages[0]
    with pytest.warns(MissingCaptionWarning, match="^1 doc"):
        nlp(doc_with(nlp, "I love Paris", "106.jpg"))
    # with the stage, no warning, and the image-only docs carry a caption into agban
    model, images = tiny
    nlp.add_pipe("image_captioner", first=True, config=captioner_config(model, tmp_path / "c.sqlite", images))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingCaptionWarning)
        out = list(nlp.pipe([doc_with(nlp, "Kolo is here", "102.jpg"), doc_with(nlp, "I love Paris", "106.jpg")]))
        nlp(doc_with(nlp, "I love Paris", "113.jpg"))
    assert all(doc._.image_caption for doc in out)
    # the generated words have vectors: the image reaches agban as caption units
    assert all(doc._.visual_units and {u["source"] for u in doc._.visual_units} == {"caption"} for doc in out)
    assert ents(nlp(doc_with(nlp, "Kolo is here", caption="a dog playing on the grass"))) == [(0, 4, "MISC")]


N_PROCESS_SCRIPT = textwrap.dedent("""
    import sys, spacy
    import spacy_agban  # noqa: F401
    model, store, images = sys.argv[1:4]
    nlp = spacy.blank("en")
    nlp.add_pipe("image_captioner", config={"model": model, "store": store, "image_root": images,
                 "generation": {"max_new_tokens": 4, "num_beams": 1}, "batch_size": 2})
    def doc(text, image):
        d = nlp.make_doc(text); d._.image = image; return d
    first = nlp(doc("first", "102.jpg"))._.image_caption  # one call first, as a user tries
    names = ["102.jpg", "106.jpg", "130.jpg", "149.jpg"]
    out = list(nlp.pipe([doc(f"post {i}", n) for i, n in enumerate(names)], n_process=2, batch_size=2))
    print("captioned", sum(bool(d._.image_caption) for d in out), out[0]._.image_caption == first,
          sorted({d._.image_caption_source["origin"] for d in out}))
""")
TIMEOUT = 240


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="n_process forks on Linux only")
@pytest.mark.timeout(TIMEOUT + 30)
def test_n_process_2_after_a_first_call(tiny, tmp_path) -> None:
    model, images = tiny
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    proc = subprocess.Popen([sys.executable, "-c", N_PROCESS_SCRIPT, str(model), str(tmp_path / "c.sqlite"),
                             str(images)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"nlp.pipe(n_process=2) with the captioner did not return within {TIMEOUT} s")
    assert proc.returncode == 0, stderr[-3000:]
    assert "captioned 4 True ['generated']" in stdout

