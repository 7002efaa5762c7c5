"""Benchmarks: the baseline's vector lookup survives reloading, the fast inference path
equals a plain per-token reference, and the quality/speed reports are built from what was
measured."""
import signal
import subprocess
import sys

import numpy
import pytest
import srsly
import spacy
import torch
import typer
from spacy.attrs import LOWER
from spacy.tokens import DocBin
from torchcrf import CRF

import spacy_agban.layers.static_vectors  # noqa: F401  (registers the baseline's embedding)
from spacy_agban.layers.static_vectors import STATIC_VECTORS
from benchmarks import (
    bio_constraints_choice, decoding_choice, dev_curves, quality, seed_ensemble, shuffled_captions, speed, train_memory,
)
from spacy_agban.layers.featurize import Featurizer, batch_static_vectors, char_ids
from spacy_agban.model.crf import viterbi_decode
from spacy_agban.units.base import DocUnits

from conftest import CAPTION_POSTS, make_examples, make_nlp

BASELINE_NER = {
    "@architectures": "spacy.TransitionBasedParser.v2",
    "state_type": "ner", "extra_state_tokens": False, "hidden_width": 8,
    "maxout_pieces": 2, "use_upper": True, "nO": None,
    "tok2vec": {
        "@architectures": "spacy.Tok2Vec.v2",
        "embed": {
            "@architectures": "spacy_agban.MultiHashEmbedLower.v1", "width": 8,
            "attrs": ["NORM", "PREFIX", "SUFFIX", "SHAPE"], "rows": [50, 50, 50, 50],
            "vectors_attr": "LOWER",
        },
        "encode": {
            "@architectures": "spacy.MaxoutWindowEncoder.v2", "width": 8, "depth": 1,
            "window_size": 1, "maxout_pieces": 2,
        },
    },
}


def baseline_nlp():
    """A tiny spaCy ner with lowercase-only vectors, as GloVe 6B has them."""
    nlp = spacy.blank("en")
    nlp.vocab.reset_vectors(width=4)
    rng = numpy.random.default_rng(0)
    for word in ("paris", "london", "love"):
        nlp.vocab.set_vector(word, rng.normal(size=4).astype("float32"))
    ner = nlp.add_pipe("ner", config={"model": BASELINE_NER})
    ner.add_label("LOC")
    nlp.initialize()
    return nlp


def static_vector_rows(nlp, text: str) -> numpy.ndarray:
    layer = next(n for n in nlp.get_pipe("ner").model.walk() if n.name == STATIC_VECTORS)
    output, _ = layer([nlp.make_doc(text)], is_train=False)
    return numpy.asarray(output.data)


def test_baseline_vector_lookup_survives_reload(tmp_path):
    nlp = baseline_nlp()
    before = static_vector_rows(nlp, "Paris PARIS paris")
    assert numpy.abs(before).sum(axis=1).min() > 0  # capitalized forms found by LOWER
    assert numpy.allclose(before[0], before[2])
    nlp.to_disk(tmp_path / "nlp")
    reloaded = spacy.load(tmp_path / "nlp")
    after = static_vector_rows(reloaded, "Paris PARIS paris")
    assert numpy.allclose(before, after)
    # the vocab's own setting is back to exact tokens after loading: the layer must not use it
    assert reloaded.vocab.vectors.attr == spacy.attrs.ORTH
    doc = reloaded("I love Paris")
    assert [t.text for t in doc] == ["I", "love", "Paris"]


def test_baseline_layer_unknown_words_are_zero():
    nlp = baseline_nlp()
    rows = static_vector_rows(nlp, "Kolo Paris")
    assert numpy.abs(rows[0]).sum() == 0 and numpy.abs(rows[1]).sum() > 0


# ----- the fast inference path equals a plain one ----------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_viterbi_equals_pytorch_crf(seed):
    torch.manual_seed(seed)
    batch, length, n_tags = 7, 9, 5
    crf = CRF(n_tags, batch_first=True)
    for param in crf.parameters():
        torch.nn.init.normal_(param)
    emissions = torch.randn(batch, length, n_tags)
    lengths = torch.randint(1, length + 1, (batch,))
    lengths[0] = length
    mask = torch.arange(length)[None, :] < lengths[:, None]
    expected = crf.decode(emissions, mask=mask)
    got = viterbi_decode(emissions, mask, crf.start_transitions, crf.transitions, crf.end_transitions)
    assert got == expected


def test_viterbi_single_token_docs():
    crf = CRF(3, batch_first=True)
    emissions = torch.randn(2, 1, 3)
    mask = torch.ones(2, 1, dtype=torch.bool)
    got = viterbi_decode(emissions, mask, crf.start_transitions, crf.transitions, crf.end_transitions)
    assert got == crf.decode(emissions, mask=mask)


def per_token_arrays(featurizer: Featurizer, docs, units, tags) -> dict:
    """The featurizer's arrays built token by token in Python: what the batched,
    cached code must reproduce exactly."""
    n_docs, max_len = len(docs), max(len(doc) for doc in docs)
    width, n_chars = featurizer.static_width, featurizer.max_word_chars
    word_ids = numpy.zeros((n_docs, max_len), dtype="int64")
    vectors = numpy.zeros((n_docs, max_len, width), dtype="float32")
    chars = numpy.zeros((n_docs, max_len, n_chars), dtype="int64")
    char_lengths = numpy.zeros((n_docs, max_len), dtype="int64")
    token_mask = numpy.zeros((n_docs, max_len), dtype="bool")
    gold = numpy.zeros((n_docs, max_len), dtype="int64")
    for i, doc in enumerate(docs):
        token_mask[i, : len(doc)] = True
        lower = doc.to_array([LOWER]).reshape(-1).astype("uint64")
        vectors[i, : len(doc)] = batch_static_vectors(doc.vocab, lower, width)
        for j, token in enumerate(doc):
            word_ids[i, j] = featurizer.word_row(token.lower_)
            ids = char_ids(token.text, n_chars)
            chars[i, j, : len(ids)] = ids
            char_lengths[i, j] = len(ids)
        gold[i, : len(doc)] = tags[i]
    return {"word_ids": word_ids, "static_vectors": vectors, "char_ids": chars,
            "char_lengths": char_lengths, "token_mask": token_mask, "tags": gold}


def test_batched_featurizer_equals_per_token():
    nlp = make_nlp()
    texts = ["Kolo is here", "I love PARIS today!!", "Straße 東京 😀 supercalifragilisticexpialidocious", "a"]
    docs = [nlp.make_doc(t) for t in texts]
    featurizer = Featurizer(["kolo", "paris", "love", "i"], 8, {"caption": 8}, max_word_chars=6)
    units = [DocUnits([]) for _ in docs]
    tags = [[1] * len(d) for d in docs]
    for _ in range(2):  # the second call reads the caches
        new = featurizer(docs, units, tags)
        old = per_token_arrays(featurizer, docs, units, tags)
        for key in ("word_ids", "static_vectors", "char_ids", "char_lengths", "token_mask", "tags"):
            assert numpy.array_equal(new[key], old[key]), key
            assert new[key].dtype == old[key].dtype, key


# ----- reports ---------------------------------------------------------------------------
def record(row, seed, dev_f, test_f, k=None):
    return {
        "row": row, "seed": seed, "k": k, "name": f"{row}-s{seed}", "model": f"x/{row}/model-best",
        "existing": False, "overrides": {}, "dev": {"ents_f": dev_f},
        "test_scores": {"ents_p": test_f, "ents_r": test_f, "ents_f": test_f},
        "test_per_type": {"PER": {"p": test_f, "r": test_f, "f": test_f}},
    }


def test_parse_existing():
    run = quality.parse_existing("training/runs/agban-s0=agban:0")
    assert (run.row, run.seed, str(run.existing)) == ("agban", 0, "training/runs/agban-s0")
    for bad in ("training/runs/agban-s0=agban", "agban:0", "training/runs/agban-s0=agban:zero"):
        with pytest.raises(typer.BadParameter, match="PATH=ROW:SEED"):
            quality.parse_existing(bad)


def test_best_row_is_chosen_on_dev_not_test():
    records = [record("a", 0, 0.70, 0.60), record("a", 1, 0.72, 0.62),
               record("b", 0, 0.65, 0.90), record("a", 0, 0.99, 0.99, k=4)]
    assert quality.best_on_dev(records) == "a"


def test_quality_table_mean_and_std():
    table = quality.quality_table([record("a", 0, 0.7, 0.60), record("a", 1, 0.7, 0.62)])
    assert "61.00 ± 1.41" in table and "| a | 0,1 |" in table


def test_k_table_includes_the_rows_own_runs_at_their_config_top_k(tmp_path):
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    for rec in (record("agban", 0, 0.7, 0.60), record("agban", 0, 0.7, 0.50, k=1),
                record("bilstm_crf", 0, 0.7, 0.55)):
        srsly.write_json(metrics / f"{rec['name']}-{rec['k']}.json", rec)
    text = quality.write_report(metrics, tmp_path / "quality.md")
    k_table = text.split("## Caption units per post")[1]
    top_k = quality.config_top_k("agban")
    assert top_k is not None and f"| agban (k={top_k}) | 0 |" in k_table
    assert "| agban (k=1) | 0 |" in k_table and "bilstm_crf" not in k_table


def test_finished_training_needs_the_log(tmp_path):
    (tmp_path / "run" / "model-best").mkdir(parents=True)
    log = tmp_path / "run.log"
    log.write_text("E  #\n  1  400  ...\n")
    assert not quality.training_finished(log, tmp_path / "run" / "model-best")
    log.write_text("...\n✔ Saved pipeline to output directory\n")
    assert quality.training_finished(log, tmp_path / "run" / "model-best")


def test_speed_measures_fresh_pipelines_side_by_side():
    agban, ner = make_nlp(), baseline_nlp()
    examples = make_examples(agban, CAPTION_POSTS)
    agban.initialize(lambda: examples)
    docs = {"agban": [agban.make_doc("I love Paris")] * 6, "ner": [ner.make_doc("I love Paris")] * 6}
    for doc in docs["agban"]:
        doc._.image_caption = "the eiffel tower at night"
    seconds = speed.interleaved({"agban": agban, "ner": ner}, docs, reps=2)
    assert {k: len(v) for k, v in seconds.items()} == {"agban": 2, "ner": 2}
    synthetic = speed.docs_of_length(docs["agban"], 16, 3)
    assert [len(d) for d in synthetic] == [16, 16, 16]
    assert synthetic[0]._.image_caption == "the eiffel tower at night"
    raw = {
        "torch_threads": 1,
        "throughput": {n: {"seconds": s, "docs": 6, "words": 18, "batch_size": 64}
                       for n, s in seconds.items()},
        "length": {"16": {"docs": 3, "seconds": {"agban": [0.1], "ner": [0.05]}}},
        "batch_size": {"8": {"docs": 6, "words": 18, "seconds": {"agban": [0.1], "ner": [0.05]}}},
    }
    summary = speed.summarize(raw, "ner")
    assert summary["throughput"]["ner"]["ratio_to_reference"] == pytest.approx(1.0)
    assert summary["length"]["16"]["agban"]["ms_per_doc"] == pytest.approx(100 / 3)


def test_set_override_needs_key_and_value(tmp_path):
    from typer.testing import CliRunner

    result = CliRunner().invoke(quality.app, [
        "--rows", "agban", "--seeds", "0", "--set", "paths.transformer",
        "--output-dir", str(tmp_path), "--metrics-dir", str(tmp_path / "m"), "--report", str(tmp_path / "q.md"),
    ])
    assert result.exit_code != 0 and "KEY=VALUE" in result.output
    assert not (tmp_path / "m").exists()  # refused before any training


def test_quality_table_shows_the_score_without_visual_context():
    with_column = record("a", 0, 0.7, 0.60)
    with_column["test_no_context"] = {"ents_p": 0.5, "ents_r": 0.5, "ents_f": 0.55}
    with_column["dev_two_ways"] = {"without_context": {"ents_f": 0.52}}
    table = quality.quality_table([with_column, record("b", 0, 0.7, 0.60)])
    assert "| a | 0 | 60.00 | 60.00 | 60.00 | 55.00 | 70.00 | 52.00 |" in table
    assert "| b | 0 | 60.00 | 60.00 | 60.00 | — | 70.00 | — |" in table
    older = record("a", 1, 0.7, 0.60)  # a run from before the column: left out, seeds named
    table = quality.quality_table([with_column, older])
    assert "| 55.00 (seed 0) |" in table


def test_rows_are_configs_or_their_variants(tmp_path):
    configs = quality.ROOT / "configs"
    assert quality.row_config("concat") == (configs / "concat.cfg", {})
    path, overrides = quality.row_config("bilstm_crf")
    assert path.name == "concat.cfg" and overrides["components.agban.model.fusion"] == "none"
    # the agban row is the paper's model, as every other use of the name
    path, overrides = quality.row_config("agban")
    assert path.name == "concat.cfg"
    assert overrides == {"components.agban.model.fusion": "gban", "components.agban.model.adversarial": True}
    assert quality.config_top_k("concat_paper") == quality.config_top_k("agban") == 8
    assert quality.config_top_k("bilstm_crf") is None  # the variant has no caption units
    with pytest.raises(typer.BadParameter, match="no model 'nope'"):
        quality.row_config("nope")


@pytest.mark.parametrize("n", [2, 3, 10, 101])
def test_derangement_moves_every_post(n):
    order = shuffled_captions.derangement(n, seed=n)
    assert sorted(order) == list(range(n))
    assert all(i != j for i, j in enumerate(order))


def test_shuffled_context_keeps_text_and_entities(tmp_path):
    nlp = make_nlp()
    refs = [eg.reference for eg in make_examples(nlp, CAPTION_POSTS)]
    for i, doc in enumerate(refs):
        doc._.image = f"img{i}.jpg"
    source, target = tmp_path / "real.spacy", tmp_path / "shuffled.spacy"
    DocBin(docs=refs, store_user_data=True).to_disk(source)
    posts, _ = shuffled_captions.shuffle_context(source, target, seed=0)
    shuffled = list(DocBin(store_user_data=True).from_disk(target).get_docs(nlp.vocab))
    assert posts == len(refs) == len(shuffled)
    pairs = {(doc._.image, doc._.image_caption) for doc in refs}
    for real, new in zip(refs, shuffled):
        assert new.text == real.text
        assert [(e.start, e.end, e.label_) for e in new.ents] == [(e.start, e.end, e.label_) for e in real.ents]
        assert new._.image != real._.image  # another post's context ...
        assert (new._.image, new._.image_caption) in pairs  # ... moved whole, image with caption


def test_dev_curves_side_by_side(tmp_path):
    def log(name, scores):
        lines = [srsly.json_dumps({"step": step, "losses": {"agban": 1.0}, "scores": {"ents_f": f1}})
                 for step, f1 in scores]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        return tmp_path / name

    raw = log("raw", [(0, 2.0), (400, 70.0), (800, 72.5), (1200, 71.0)])
    averaged = log("averaged", [(0, 2.0), (400, 71.0), (800, 72.0), (1200, 73.0), (1600, 72.0)])
    runs = [dev_curves.parse_run(f"raw={raw}"), dev_curves.parse_run(str(averaged))]
    assert runs[1][0] == "averaged"
    text = dev_curves.table(runs, [dev_curves.dev_scores(path) for _, path in runs])
    assert "| 800 | **72.50** | 72.00 |" in text
    assert "| 1,600 |  | 72.00 |" in text
    assert "| best (step) | 72.50 (800) | 73.00 (1,200) |" in text
    assert "| last step | 1,200 | 1,600 |" in text
    with pytest.raises(typer.BadParameter):
        dev_curves.parse_run("=folder")


def test_bio_constraints_report_gives_each_change_and_their_mean():
    def scores(off, on):
        return {"off": {"ents_f": off}, "on": {"ents_f": on}}

    results = {
        "a": {"with_context": scores(0.70, 0.71), "without_context": scores(0.69, 0.69)},
        "b": {"with_context": scores(0.72, 0.72), "without_context": scores(0.70, 0.68)},
    }
    text = bio_constraints_choice.report(results)
    assert "| `a` | 70.00 | 71.00 | +1.00 | 69.00 | 69.00 | +0.00 |" in text
    assert "| mean change (2 models) | | | **+0.50** | | | **-1.00** |" in text


def test_a_training_started_by_train_memory_can_be_stopped_with_sigint():
    """Started from a background job (SIGINT ignored), the child still turns SIGINT into
    KeyboardInterrupt, so spaCy's training loop saves model-last when stopped by hand."""
    probe = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        inherited = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        restored = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True,
            preexec_fn=train_memory._interruptible,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    assert inherited.stdout.strip() == "False"  # the trap the helper avoids
    assert restored.stdout.strip() == "True"


def test_seed_ensemble_keeps_the_spans_most_members_predict():
    members = [
        [[(0, 1, "PER"), (3, 5, "LOC")], []],
        [[(0, 1, "PER"), (3, 5, "ORG")], [(2, 3, "MISC")]],
        [[(0, 2, "PER"), (3, 5, "LOC")], [(2, 3, "MISC")]],
    ]
    # same boundaries with another label is another span: it gets no majority
    assert seed_ensemble.vote(members, 2) == [[(0, 1, "PER"), (3, 5, "LOC")], [(2, 3, "MISC")]]
    assert seed_ensemble.vote(members, 3) == [[], []]
    # with an even count two kept spans may overlap: the one with more votes wins
    tied = [[[(0, 2, "ORG")]], [[(0, 2, "ORG")]], [[(1, 3, "LOC")]], [[(1, 3, "LOC")]], [[(0, 2, "ORG")]]]
    assert seed_ensemble.vote(tied, 2) == [[(0, 2, "ORG")]]


def test_seed_ensemble_scores_spans_as_spacy_does(tmp_path):
    nlp = spacy.blank("en")
    doc = nlp.make_doc("Kevin Durant plays in Oklahoma City tonight")
    doc.ents = [doc.char_span(0, 12, label="PER"), doc.char_span(22, 35, label="LOC")]
    path = tmp_path / "refs.spacy"
    DocBin(docs=[doc], store_user_data=True).to_disk(path)
    # spans in characters: the members' tokens need not be the references'
    assert seed_ensemble.score(path, [[(0, 12, "PER"), (22, 35, "LOC")]])["ents_f"] == pytest.approx(100.0)
    half = seed_ensemble.score(path, [[(0, 12, "PER"), (22, 35, "ORG")]])
    assert (half["ents_p"], half["ents_r"]) == (pytest.approx(50.0), pytest.approx(50.0))
    with pytest.raises(ValueError, match="token boundaries"):
        seed_ensemble.score(path, [[(0, 8, "PER")]])
    with pytest.raises(ValueError):  # a post short: predictions and references out of step
        seed_ensemble.score(path, [])


def test_decoding_choice_reports_each_value_and_the_best_mean():
    def column(*f1s):
        return {v: {"ents_f": f} for v, f in zip(("0.0", "0.5"), f1s)}

    results = {
        "a": {"with_context": column(0.70, 0.72), "without_context": column(0.69, 0.70)},
        "b": {"with_context": column(0.72, 0.71), "without_context": column(0.70, 0.70)},
    }
    text = decoding_choice.report(results, ["0.0", "0.5"])
    assert "| `a` | 70.00 | 69.00 | 72.00 | 70.00 |" in text
    assert "| mean (2 models) | 71.00 | 69.50 | 71.50 | 70.00 |" in text
    assert "0.0: 70.25, 0.5: 70.75. Best: **0.5**." in text
    assert "Best" not in decoding_choice.report(results, ["0.0", "0.5"], choice=False)
    assert [decoding_choice.parse_value(v) for v in ("true", "False", "0.45")] == [True, False, 0.45]
    with pytest.raises(ValueError):
        decoding_choice.parse_value("half")
