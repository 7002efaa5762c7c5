"""The whole AGBAN network: projectors, adversarial learning, fusion, CRF."""
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from .adversarial import GradientReversal, ModalityDiscriminator, adversarial_loss, dann_lambda
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
    outside_only: Optional[torch.Tensor] = None  # (B, T) bool: tokens that can only be O
    token_keys: Optional[torch.Tensor] = None  # (B, T) long: an id of each token's exact form
    shape_ids: Optional[torch.Tensor] = None  # (B, T) long: each token's word shape, 0 on padding
    teacher: Optional[torch.Tensor] = None  # (B, T, n_tags) a teacher's tag marginals; all 0 = none


@dataclass
class Output:
    features: Optional[torch.Tensor] = None  # G_M (B, T, d)
    crf_loss: Optional[torch.Tensor] = None
    adversarial_loss: Optional[torch.Tensor] = None
    cross_view_loss: Optional[torch.Tensor] = None
    distill_loss: Optional[torch.Tensor] = None
    marginals: Optional[torch.Tensor] = None  # (B, T, n_tags) CRF tag marginals (CRFOutput.store_marginals)
    tags: Optional[List[List[int]]] = None
    confidences: Optional[List[List[float]]] = None  # per doc, per entity (CRFOutput.store_confidence)
    attention: Optional[torch.Tensor] = None  # (B, T, K)
    gate: Optional[torch.Tensor] = None  # (B, T, d)
    unit_mask: Optional[torch.Tensor] = None  # (B, K) the units the fusion saw (not padding, not dropped)
    unit_sources: Optional[List[str]] = None  # (K,) the source of each unit column
    text_features: Optional[torch.Tensor] = None  # G_T (B, T, d)
    visual_features: Optional[torch.Tensor] = None  # G_V (B, K, d)


class AGBANModule(nn.Module):
    """Text projector -> (visual projector, GRL + discriminator) -> fusion -> CRF.

    ``fusion`` picks the row of Table III: "none" (BiLSTM-CRF), "concat", "ban",
    "gban"; ``adversarial`` adds the modality discriminator behind a gradient
    reversal layer (AGBAN = gban + adversarial).

    Training for posts without visual context (all off by default = the paper):
    ``visual_dropout`` masks all units of a training doc with that probability,
    ``source_dropout`` masks each source of a doc that has several; ``cross_view``
    weighs a KL term pulling the text-only view's CRF tag marginals towards the
    multimodal view's (ITA's cross-view alignment, Wang et al. NAACL 2022).
    ``adversarial_reduction`` and ``grl_warmup_steps`` scale the adversarial loss
    and schedule the GRL weight (DANN).

    ``distill`` weighs KL(teacher || model) of the per-token CRF tag marginals, summed
    over the tokens that have a teacher's marginals (``Batch.teacher``; knowledge
    distillation from a stronger tagger, beside the gold tags' CRF loss).
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
        visual_dropout: float = 0.0,
        source_dropout: float = 0.0,
        cross_view: float = 0.0,
        adversarial_reduction: str = "mean",
        grl_warmup_steps: int = 0,
        shape_dim: int = 0,
        n_shapes: int = 1,
        distill: float = 0.0,
    ):
        super().__init__()
        for name, rate in (("visual_dropout", visual_dropout), ("source_dropout", source_dropout)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {rate}")
        if cross_view < 0:
            raise ValueError(f"cross_view must be >= 0, got {cross_view}")
        if distill < 0:
            raise ValueError(f"distill must be >= 0, got {distill}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if fusion == "none" and adversarial:
            raise ValueError("adversarial learning needs visual units: set fusion != 'none'")
        if fusion != "none" and not unit_dims:
            raise ValueError(f"fusion={fusion!r} needs at least one visual unit source")
        self.fusion_kind = fusion
        self.text = TextProjector(
            n_words, static_width, word_dim, n_chars, char_dim, char_hidden, hidden, dropout,
            external_width=external_width, shape_dim=shape_dim, n_shapes=n_shapes,
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
        self.visual_dropout = visual_dropout
        self.source_dropout = source_dropout
        self.cross_view = cross_view
        self.distill = distill
        self.adversarial_reduction = adversarial_reduction
        self.grl_lambda = grl_lambda
        self.grl_warmup_steps = grl_warmup_steps
        self.train_steps = 0  # training forwards seen, for the GRL schedule (not saved)

    @property
    def unit_sources(self) -> List[str]:
        return list(self.visual.inputs) if self.visual is not None else []

    def set_dropout(self, rate: float) -> None:
        """The rate of the dropout layers that ``dropout`` sizes (text, visual, CRF);
        the discriminator's and the modality dropout keep their own."""
        layers = [self.text.dropout, self.output.dropout]
        if self.visual is not None:
            layers.extend(m for m in self.visual.modules() if isinstance(m, nn.Dropout))
        for layer in layers:
            layer.p = rate

    def drop_units(self, unit_masks: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Modality dropout: hide all units of some docs, and some sources of others.

        Random draws happen only for a rate > 0, so with both rates at 0 training
        consumes the random stream exactly as without this step.
        """
        masks = dict(unit_masks)
        sources = list(masks)
        if self.source_dropout > 0 and len(sources) > 1:
            present = torch.stack([masks[s].any(dim=1) for s in sources], dim=1)  # (B, S)
            several = present.sum(dim=1, keepdim=True) > 1
            drop = (torch.rand(present.shape, device=present.device) < self.source_dropout) & several
            for i, source in enumerate(sources):
                masks[source] = masks[source] & ~drop[:, i : i + 1]
        if self.visual_dropout > 0:
            batch = next(iter(masks.values())).shape[0]
            device = next(iter(masks.values())).device
            keep = torch.rand((batch, 1), device=device) >= self.visual_dropout
            masks = {source: mask & keep for source, mask in masks.items()}
        return masks

    def fuse(self, g_t: torch.Tensor, g_v: torch.Tensor, unit_mask: torch.Tensor, out: Output) -> torch.Tensor:
        assert self.fusion is not None
        if isinstance(self.fusion, GatedBilinearAttention):
            g_m, out.attention, out.gate = self.fusion(g_t, g_v, unit_mask)
            return g_m
        return self.fusion(g_t, g_v, unit_mask)

    def features(self, batch: Batch) -> Output:
        """G_M for every token, with the adversarial loss and attention on the way."""
        g_t = self.text(
            batch.word_ids, batch.static_vectors, batch.char_ids, batch.char_lengths,
            batch.token_mask, batch.external, batch.token_keys, batch.shape_ids,
        )
        out = Output(features=g_t, text_features=g_t)
        if self.visual is None or self.fusion is None:
            return out
        sources = self.unit_sources
        g_v = self.visual({s: batch.units[s] for s in sources})
        unit_masks = {s: batch.unit_masks[s] for s in sources}
        if self.training:
            unit_masks = self.drop_units(unit_masks)
        unit_mask = torch.cat([unit_masks[s] for s in sources], dim=1)
        out.unit_mask, out.visual_features = unit_mask, g_v
        out.unit_sources = [s for s in sources for _ in range(unit_masks[s].shape[1])]
        if self.discriminator is not None and self.reversal is not None:
            if self.training:
                self.reversal.lam = dann_lambda(self.grl_lambda, self.train_steps, self.grl_warmup_steps)
            out.adversarial_loss = adversarial_loss(
                self.discriminator,
                self.reversal(g_t[batch.token_mask]),
                self.reversal(g_v[unit_mask]),
                reduction=self.adversarial_reduction,
            )
        out.features = self.fuse(g_t, g_v, unit_mask, out)
        return out

    def cross_view_loss(self, batch: Batch, out: Output, g_m_scores: torch.Tensor) -> torch.Tensor:
        """KL(multimodal || text-only) of the per-token CRF tag marginals, summed.

        The text-only view is the fusion with every unit masked (what a post without
        context gets). The multimodal marginals are the target (no gradient through
        them), as in ITA; only docs that kept units count, since for the others the
        two views are the same input.
        """
        assert out.unit_mask is not None and out.text_features is not None
        assert out.visual_features is not None
        no_units = torch.zeros_like(out.unit_mask)
        text_view = self.fuse(out.text_features, out.visual_features, no_units, Output())
        log_text = self.output.log_marginals(self.output.scores(text_view), batch.token_mask)
        with torch.no_grad():
            log_target = self.output.log_marginals(g_m_scores, batch.token_mask)
        kl = (log_target.exp() * (log_target - log_text)).sum(dim=-1)
        counted = batch.token_mask & out.unit_mask.any(dim=1, keepdim=True)
        return kl.masked_fill(~counted, 0.0).sum()

    def distill_loss(self, batch: Batch, scores: torch.Tensor) -> torch.Tensor:
        """KL(teacher || model) of the per-token CRF tag marginals, summed over the
        real tokens of the docs that have a teacher's marginals."""
        assert batch.teacher is not None
        teacher = batch.teacher.to(scores.dtype)
        counted = batch.token_mask & (teacher.sum(dim=-1) > 0)
        log_model = self.output.log_marginals(scores, batch.token_mask)
        # 0 * log 0 is 0: a tag the teacher rules out adds nothing
        log_teacher = torch.log(teacher.clamp_min(1e-12))
        kl = (teacher * (log_teacher - log_model)).sum(dim=-1)
        return kl.masked_fill(~counted, 0.0).sum()

    def forward(
        self, batch: Batch, external: Optional[torch.Tensor] = None, decode: bool = False
    ) -> Output:
        if external is not None:
            batch.external = external
        out = self.features(batch)
        g_m = out.features
        assert g_m is not None
        if decode:
            out.tags, out.confidences = self.output.decode_scored(g_m, batch.token_mask, batch.outside_only)
            if self.output.store_marginals:  # the model's own belief, before any decoding rule
                with torch.no_grad():
                    out.marginals = self.output.log_marginals(
                        self.output.scores(g_m).float(), batch.token_mask).exp()
        if batch.tags is not None:
            scores = self.output.scores(g_m)
            out.crf_loss = self.output.nll(scores, batch.tags, batch.token_mask)
            if out.adversarial_loss is None:
                out.adversarial_loss = g_m.new_zeros(())
            out.cross_view_loss = g_m.new_zeros(())
            if self.cross_view > 0 and out.visual_features is not None:
                out.cross_view_loss = self.cross_view * self.cross_view_loss(batch, out, scores)
            out.distill_loss = g_m.new_zeros(())
            if self.distill > 0 and batch.teacher is not None:
                out.distill_loss = self.distill * self.distill_loss(batch, scores)
            if self.training:
                self.train_steps += 1
        return out
