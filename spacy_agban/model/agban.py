"""The whole AGBAN network: projectors, adversarial learning, fusion, CRF."""
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from .adversarial import GradientReversal, ModalityDiscriminator, adversarial_loss
from .crf import CRFOutput
from .fusion import ConcatFusion, GatedBilinearAttention
from .projectors import TextProjector, VisualProjector

FUSIONS = ("none", "concat", "ban", "gban")


@dataclass
class Batch:
    """Padded tensors for a batch of non-empty docs (B docs, T tokens, K units)."""

    word_ids: torch.Tensor  # (B, T) long, 0 = padding/unknown
    static_vectors: torch.Tensor  # (B, T, W) float, zeros without vectors
    char_ids: torch.Tensor  # (B, T, L) long
    char_lengths: torch.Tensor  # (B, T) long, >= 1 on real tokens
    token_mask: torch.Tensor  # (B, T) bool, contiguous from the start
    units: Dict[str, torch.Tensor] = field(default_factory=dict)  # source -> (B, K_s, D_s)
    unit_masks: Dict[str, torch.Tensor] = field(default_factory=dict)  # source -> (B, K_s)
    external: Optional[torch.Tensor] = None  # (B, T, E) features from another encoder
    tags: Optional[torch.Tensor] = None  # (B, T) long gold tags, 0 on padding


@dataclass
class Output:
    features: Optional[torch.Tensor] = None  # G_M (B, T, d)
    crf_loss: Optional[torch.Tensor] = None
    adversarial_loss: Optional[torch.Tensor] = None
    tags: Optional[List[List[int]]] = None
    attention: Optional[torch.Tensor] = None  # (B, T, K)
    gate: Optional[torch.Tensor] = None  # (B, T, d)


class AGBANModule(nn.Module):
    """Text projector -> (visual projector, GRL + discriminator) -> fusion -> CRF.

    ``fusion`` picks the row of Table III: "none" (BiLSTM-CRF), "concat", "ban",
    "gban"; ``adversarial`` adds the modality discriminator behind a gradient
    reversal layer (AGBAN = gban + adversarial).
    """

    def __init__(
        self,
        *,
        n_tags: int,
        n_words: int,
        static_width: int,
        word_dim: int,
        n_chars: int,
        char_dim: int,
        char_hidden: int,
        hidden: int,
        unit_dims: Dict[str, int],
        fusion: str,
        adversarial: bool,
        grl_lambda: float,
        gban_dim: int,
        gate_dim: int,
        discriminator_hidden: int,
        dropout: float,
        external_width: int = 0,
    ):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if fusion == "none" and adversarial:
            raise ValueError("adversarial learning needs visual units: set fusion != 'none'")
        if fusion != "none" and not unit_dims:
            raise ValueError(f"fusion={fusion!r} needs at least one visual unit source")
        self.fusion_kind = fusion
        self.text = TextProjector(
            n_words, static_width, word_dim, n_chars, char_dim, char_hidden, hidden, dropout,
            external_width=external_width,
        )
        self.visual = VisualProjector(unit_dims, hidden, dropout) if fusion != "none" else None
        self.fusion: Optional[nn.Module] = None
        if fusion == "concat":
            self.fusion = ConcatFusion(hidden)
        elif fusion in ("ban", "gban"):
            self.fusion = GatedBilinearAttention(hidden, gban_dim, gate_dim, gated=fusion == "gban")
        self.reversal = GradientReversal(grl_lambda) if adversarial else None
        self.discriminator = (
            ModalityDiscriminator(hidden, discriminator_hidden) if adversarial else None
        )
        self.output = CRFOutput(hidden, n_tags, dropout)

    @property
    def unit_sources(self) -> List[str]:
        return list(self.visual.inputs) if self.visual is not None else []

    def features(self, batch: Batch) -> Output:
        """G_M for every token, with the adversarial loss and attention on the way."""
        g_t = self.text(
            batch.word_ids, batch.static_vectors, batch.char_ids, batch.char_lengths,
            batch.token_mask, batch.external,
        )
        out = Output(features=g_t)
        if self.visual is None or self.fusion is None:
            return out
        sources = self.unit_sources
        g_v = self.visual({s: batch.units[s] for s in sources})
        unit_mask = torch.cat([batch.unit_masks[s] for s in sources], dim=1)
        if self.discriminator is not None and self.reversal is not None:
            out.adversarial_loss = adversarial_loss(
                self.discriminator,
                self.reversal(g_t[batch.token_mask]),
                self.reversal(g_v[unit_mask]),
            )
        if isinstance(self.fusion, GatedBilinearAttention):
            out.features, out.attention, out.gate = self.fusion(g_t, g_v, unit_mask)
        else:
            out.features = self.fusion(g_t, g_v, unit_mask)
        return out

    def forward(
        self, batch: Batch, external: Optional[torch.Tensor] = None, decode: bool = False
    ) -> Output:
        if external is not None:
            batch.external = external
        out = self.features(batch)
        g_m = out.features
        assert g_m is not None
        if decode:
            out.tags = self.output.decode(g_m, batch.token_mask)
        if batch.tags is not None:
            out.crf_loss = self.output.loss(g_m, batch.tags, batch.token_mask)
            if out.adversarial_loss is None:
                out.adversarial_loss = g_m.new_zeros(())
        return out
