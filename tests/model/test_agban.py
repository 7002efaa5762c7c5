"""The torch modules on their own: GRL, masking, CRF inputs."""
import pytest
import torch

from spacy_agban.model import AGBANModule, Batch, GatedBilinearAttention, GradientReversal
from spacy_agban.model.fusion import ConcatFusion
from model_support import tiny_module


def test_gradient_reversal_flips_the_sign_times_lambda():
    x = torch.randn(4, 3, requires_grad=True)
    weights = torch.randn(4, 3)
    (GradientReversal(0.3)(x) * weights).sum().backward()
    assert torch.allclose(x.grad, -0.3 * weights)
    assert torch.equal(GradientReversal(0.3)(x), x)


def _attention(gated: bool = True) -> GatedBilinearAttention:
    torch.manual_seed(0)
    return GatedBilinearAttention(width=6, rank=5, gate_width=4, gated=gated).eval()


@pytest.mark.parametrize("gated", [True, False])
def test_a_padded_unit_changes_nothing(gated):
    attention = _attention(gated)
    tokens, units = torch.randn(1, 3, 6), torch.randn(1, 2, 6)
    mask = torch.tensor([[True, True]])
    padded_units = torch.cat([units, 100 * torch.randn(1, 3, 6)], dim=1)
    padded_mask = torch.tensor([[True, True, False, False, False]])
    out, weights, _ = attention(tokens, units, mask)
    out_padded, weights_padded, _ = attention(tokens, padded_units, padded_mask)
    assert torch.allclose(out, out_padded, atol=1e-6)
    assert torch.allclose(weights_padded[..., :2], weights, atol=1e-6)
    assert torch.all(weights_padded[..., 2:] == 0)
    assert torch.allclose(weights.sum(-1), torch.ones(1, 3))


def test_no_units_leave_the_token_features_unchanged():
    attention = _attention()
    tokens = torch.randn(2, 3, 6)
    units = 50 * torch.randn(2, 4, 6)
    mask = torch.tensor([[False] * 4, [True, False, False, False]])
    out, weights, _ = attention(tokens, units, mask)
    assert torch.equal(out[0], tokens[0])
    assert torch.all(weights[0] == 0)
    assert not torch.equal(out[1], tokens[1])


def test_concat_ignores_padding():
    torch.manual_seed(0)
    concat = ConcatFusion(6)
    tokens, units = torch.randn(1, 2, 6), torch.randn(1, 2, 6)
    padded = torch.cat([units, torch.randn(1, 1, 6)], dim=1)
    out = concat(tokens, units, torch.tensor([[True, True]]))
    out_padded = concat(tokens, padded, torch.tensor([[True, True, False]]))
    assert torch.allclose(out, out_padded, atol=1e-6)


def _batch(lengths, n_units, extra_tokens=0, extra_units=0) -> Batch:
    torch.manual_seed(1)
    b, t = len(lengths), max(lengths) + extra_tokens
    k = max(n_units) + extra_units
    token_mask = torch.tensor([[j < n for j in range(t)] for n in lengths])
    unit_mask = torch.tensor([[j < n for j in range(k)] for n in n_units])
    return Batch(
        word_ids=torch.randint(0, 10, (b, t)) * token_mask,
        static_vectors=torch.randn(b, t, 4) * token_mask[..., None],
        char_ids=torch.randint(1, 100, (b, t, 3)),
        char_lengths=torch.full((b, t), 3),
        token_mask=token_mask,
        units={"caption": torch.randn(b, k, 4) * unit_mask[..., None]},
        unit_masks={"caption": unit_mask},
    )


def test_a_padded_token_changes_nothing_in_the_whole_model():
    module = tiny_module()
    base = _batch([3], [2])
    padded = _batch([3], [2], extra_tokens=4, extra_units=3)
    # same real content, garbage in the padding
    padded.word_ids[:, :3] = base.word_ids
    padded.static_vectors[:, :3] = base.static_vectors
    padded.char_ids[:, :3] = base.char_ids
    padded.static_vectors[:, 3:] = 99.0
    padded.units["caption"][:, :2] = base.units["caption"]
    padded.units["caption"][:, 2:] = -99.0
    out = module.features(base)
    out_padded = module.features(padded)
    assert torch.allclose(out.features, out_padded.features[:, :3], atol=1e-5)
    assert torch.allclose(out.adversarial_loss, out_padded.adversarial_loss, atol=1e-6)
    assert module(base, decode=True).tags == module(padded, decode=True).tags


def test_crf_sees_only_unmasked_first_steps(monkeypatch):
    """pytorch-crf needs every sequence's first step unmasked (the pipe drops empty docs)."""
    module = tiny_module()
    seen = []
    original = module.output.crf.forward

    def spy(emissions, tags, mask=None, reduction="sum"):
        seen.append(mask)
        return original(emissions, tags, mask=mask, reduction=reduction)

    monkeypatch.setattr(module.output.crf, "forward", spy)
    batch = _batch([3, 1], [2, 0])
    batch.tags = torch.zeros(2, 3, dtype=torch.long)
    out = module(batch)
    assert seen and bool(seen[0][:, 0].all()) and seen[0].dtype == torch.bool
    assert out.crf_loss.item() > 0


def test_adversarial_needs_units_and_fusion():
    with pytest.raises(ValueError, match="adversarial"):
        tiny_module(fusion="none", unit_dims={})
    with pytest.raises(ValueError, match="fusion"):
        tiny_module(fusion="bilinear")
    with pytest.raises(ValueError, match="visual unit"):
        tiny_module(unit_dims={}, adversarial=False)


def test_whitespace_tokens_are_decoded_as_outside_only():
    """spaCy never puts an entity on a whitespace token; the Viterbi search obeys that."""
    from spacy_agban.model.crf import CRFOutput

    torch.manual_seed(0)
    crf = CRFOutput(4, 3, dropout=0.0).eval()
    with torch.no_grad():
        crf.emissions.weight.zero_()
        crf.emissions.bias.copy_(torch.tensor([0.0, 5.0, 6.0]))  # entity tags win everywhere
        for p in (crf.crf.start_transitions, crf.crf.transitions, crf.crf.end_transitions):
            p.zero_()
    features = torch.zeros(1, 4, 4)
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert 0 not in crf.decode(features, mask)[0]
    space = torch.tensor([[False, True, False, True]])
    tags = crf.decode(features, mask, space)[0]
    assert tags[1] == 0 and tags[3] == 0 and tags[0] != 0 and tags[2] != 0


def test_pipe_never_ends_an_entity_on_whitespace():
    from conftest import TEXT_POSTS, make_examples, make_nlp, train

    nlp = make_nlp(fusion="none", adversarial=False, caption_top_k=None)
    train(nlp, make_examples(nlp, TEXT_POSTS), steps=80)
    for text in ("Kolo  is here", "I love Paris \n", "Kolo\n\nis here", "   "):
        doc = nlp(text)
        assert all(not token.is_space for ent in doc.ents for token in ent), (text, doc.ents)
    assert [e.text for e in nlp("Kolo  is here").ents] == ["Kolo"]
