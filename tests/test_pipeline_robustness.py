"""Training for posts without visual context: modality dropout, cross-view alignment."""
import itertools

import pytest
import torch

from spacy_agban.training.docs_io import fresh_doc, read_references
from spacy_agban.training.evaluation import evaluate_both
from spacy_agban.model import AGBANModule, Batch
from spacy_agban.model.adversarial import dann_lambda
from spacy_agban.model.crf import CRFOutput, crf_log_marginals

from conftest import CAPTION_POSTS, ents, make_doc, make_examples, make_nlp, train
from model_support import tiny_module


def _crf(n_tags: int = 3) -> CRFOutput:
    torch.manual_seed(3)
    crf = CRFOutput(4, n_tags, dropout=0.0)
    for p in (crf.crf.start_transitions, crf.crf.transitions, crf.crf.end_transitions):
        torch.nn.init.normal_(p)
    return crf


def _brute_force_marginals(crf: CRFOutput, scores: torch.Tensor, length: int) -> torch.Tensor:
    """P(y_t = k) by enumerating every tag sequence of one doc."""
    n_tags = scores.shape[-1]
    c = crf.crf
    paths = list(itertools.product(range(n_tags), repeat=length))
    log_weights = []
    for path in paths:
        w = c.start_transitions[path[0]] + scores[0, path[0]] + c.end_transitions[path[-1]]
        for t in range(1, length):
            w = w + c.transitions[path[t - 1], path[t]] + scores[t, path[t]]
        log_weights.append(w)
    probs = torch.softmax(torch.stack(log_weights), dim=0)
    out = torch.zeros(length, n_tags)
    for p, path in zip(probs, paths):
        for t, k in enumerate(path):
            out[t, k] += p
    return out


def test_crf_marginals_match_enumeration_and_sum_to_one():
    crf = _crf()
    torch.manual_seed(4)
    lengths = [4, 1, 3]
    scores = torch.randn(3, 4, 3)
    mask = torch.tensor([[t < n for t in range(4)] for n in lengths])
    marginals = crf.log_marginals(scores, mask).exp()
    for i, n in enumerate(lengths):
        expected = _brute_force_marginals(crf, scores[i], n)
        assert torch.allclose(marginals[i, :n], expected, atol=1e-5)
        assert torch.allclose(marginals[i, :n].sum(-1), torch.ones(n), atol=1e-5)


def test_crf_log_partition_agrees_with_pytorch_crf():
    """Forward-backward and pytorch-crf's likelihood describe the same distribution."""
    crf = _crf()
    scores = torch.randn(2, 5, 3)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    tags = torch.zeros(2, 5, dtype=torch.long)
    log_marginals = crf_log_marginals(
        scores, mask, crf.crf.start_transitions, crf.crf.transitions, crf.crf.end_transitions
    )
    # P(all O) <= P(y_0 = O): a bound that fails if the partition function is off
    nll = crf.nll(scores[:1], tags[:1], mask[:1])
    assert torch.exp(-nll) <= log_marginals[0, 0, 0].exp() + 1e-6


def _module(**overrides) -> AGBANModule:
    """The tiny module of test_model.py, in training mode."""
    return tiny_module(**overrides).train()


def _batch(n_docs: int = 4, length: int = 3, n_units: int = 2) -> Batch:
    torch.manual_seed(1)
    return Batch(
        word_ids=torch.randint(0, 10, (n_docs, length)),
        static_vectors=torch.randn(n_docs, length, 4),
        char_ids=torch.randint(1, 100, (n_docs, length, 3)),
        char_lengths=torch.full((n_docs, length), 3),
        token_mask=torch.ones(n_docs, length, dtype=torch.bool),
        units={"caption": torch.randn(n_docs, n_units, 4)},
        unit_masks={"caption": torch.ones(n_docs, n_units, dtype=torch.bool)},
        tags=torch.randint(0, 5, (n_docs, length)),
    )


def test_visual_dropout_masks_whole_docs_at_its_rate_and_never_at_prediction():
    module = _module(visual_dropout=0.3).train()
    batch = _batch(n_docs=4000, length=2, n_units=3)
    torch.manual_seed(5)
    mask = module.features(batch).unit_mask
    per_doc = mask.any(dim=1)
    assert torch.equal(mask.all(dim=1), per_doc)  # a doc keeps all its units or none
    assert abs(1 - per_doc.float().mean().item() - 0.3) < 0.03
    module.eval()
    assert bool(module.features(batch).unit_mask.all())


def test_source_dropout_masks_one_source_of_docs_with_several():
    module = _module(source_dropout=0.5, unit_dims={"caption": 4, "object": 4}).train()
    batch = _batch(n_docs=2000, length=2)
    batch.units["object"] = torch.randn(2000, 1, 4)
    batch.unit_masks["object"] = torch.ones(2000, 1, dtype=torch.bool)
    batch.unit_masks["object"][1000:] = False  # these docs have the caption alone
    torch.manual_seed(6)
    out = module.features(batch)
    assert out.unit_sources == ["caption", "caption", "object"]  # the columns of unit_mask
    mask = out.unit_mask
    caption_kept, object_kept = mask[:, :2].any(dim=1), mask[:, 2]
    assert bool(caption_kept[1000:].all())  # one source only: never dropped
    assert abs(caption_kept[:1000].float().mean().item() - 0.5) < 0.06
    assert abs(object_kept[:1000].float().mean().item() - 0.5) < 0.06


def test_with_the_new_settings_off_the_loss_is_todays_exactly():
    """No extra random draws, no extra term: CRF NLL of G_M + the adversarial loss."""
    module = _module(visual_dropout=0.0, source_dropout=0.0, cross_view=0.0).train()
    batch = _batch()
    torch.manual_seed(7)
    state = torch.get_rng_state()
    out = module(batch)
    assert torch.equal(torch.get_rng_state(), state)
    features = module.features(batch)
    expected = module.output.loss(features.features, batch.tags, batch.token_mask)
    assert torch.equal(out.crf_loss, expected)
    assert torch.equal(out.adversarial_loss, features.adversarial_loss)
    assert out.cross_view_loss.item() == 0.0


def test_cross_view_is_the_kl_between_the_views_and_trains_the_text_view_only():
    module = _module(cross_view=2.0, adversarial=False).train()
    batch = _batch()
    out = module(batch)
    assert out.cross_view_loss.item() > 0
    g_m_scores = module.output.scores(out.features)
    text_scores = module.output.scores(out.text_features)  # gban with no units = G_T
    log_p = module.output.log_marginals(g_m_scores, batch.token_mask)
    log_q = module.output.log_marginals(text_scores, batch.token_mask)
    kl = (log_p.exp() * (log_p - log_q)).sum()
    assert torch.allclose(out.cross_view_loss, 2.0 * kl, rtol=1e-4)
    module.zero_grad()
    out.cross_view_loss.backward()
    # the target (multimodal view) gets no gradient: the fusion's attention is untouched
    assert module.fusion.token_proj.weight.grad is None or not module.fusion.token_proj.weight.grad.any()
    assert module.text.parameters().__next__().grad is not None


def test_cross_view_ignores_docs_without_units():
    module = _module(cross_view=1.0, adversarial=False).train()
    batch = _batch()
    batch.unit_masks["caption"][:] = False
    assert module(batch).cross_view_loss.item() == 0.0


def test_dann_schedule_rises_from_zero_to_lambda():
    assert dann_lambda(2.0, 0, 100) == 0.0
    assert 0 < dann_lambda(2.0, 10, 100) < dann_lambda(2.0, 50, 100) < 2.0
    assert dann_lambda(2.0, 100, 100) == pytest.approx(2.0 * (2 / (1 + 2.718281828 ** -10) - 1))
    assert dann_lambda(2.0, 5, 0) == 2.0


def test_sum_reduction_scales_the_adversarial_loss_with_the_batch():
    mean = _module(adversarial_reduction="mean").train()
    summed = _module(adversarial_reduction="sum").train()
    batch = _batch()
    assert summed(batch).adversarial_loss.item() > 4 * mean(batch).adversarial_loss.item()


V3 = {"@architectures": "spacy_agban.AGBAN.v3"}


@pytest.mark.slow
def test_overfit_with_visual_dropout_tags_posts_without_caption_like_its_text_only_twin():
    """Entities fixed by the text: with dropout the no-caption path learns them too."""
    posts = [p for p in CAPTION_POSTS if p[0] != "Kolo is here"] + [
        ("Kolo is here", "a man smiling at the camera", [(0, 4, "PER")])
    ]
    nlp = make_nlp(**V3, visual_dropout=0.5, cross_view=1.0)
    twin = make_nlp(fusion="none", adversarial=False, caption_top_k=None)
    train(nlp, make_examples(nlp, posts), steps=120)
    train(twin, make_examples(twin, posts), steps=120)
    for text, caption, gold in posts:
        assert ents(nlp(make_doc(nlp, text, caption))) == gold
        assert ents(nlp(make_doc(nlp, text))) == ents(twin(make_doc(twin, text))) == gold


def test_evaluation_without_context_removes_the_units(caption_pipeline, tmp_path):
    from spacy.tokens import DocBin

    nlp, _ = caption_pipeline
    docbin = DocBin(store_user_data=True)
    for eg in make_examples(nlp, CAPTION_POSTS):
        docbin.add(eg.reference)
    path = tmp_path / "posts.spacy"
    docbin.to_disk(path)
    references = list(read_references(nlp, path))
    with_units = [nlp(fresh_doc(nlp, ref, True))._.visual_units for ref in references]
    without = [nlp(fresh_doc(nlp, ref, False))._.visual_units for ref in references]
    assert all(units for units in with_units) and not any(without)
    scores = evaluate_both(nlp, path)
    assert scores["with_context"]["ents_f"] == 1.0  # overfit on these very posts
    # "Kolo" is PER or MISC only by its caption: without it one of the two is wrong
    assert scores["without_context"]["ents_f"] < 1.0
