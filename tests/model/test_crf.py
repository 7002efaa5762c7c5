"""The batched Viterbi decoding equals pytorch-crf's ``decode``, ties and one-token docs included."""
import pytest
import torch
from torchcrf import CRF

from spacy_agban.model.crf import viterbi_decode


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
