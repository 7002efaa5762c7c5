"""Pure PyTorch modules of AGBAN (no spaCy inside), named after the paper."""
from .adversarial import GradientReversal, ModalityDiscriminator, adversarial_loss
from .agban import AGBANModule, Batch
from .crf import CRFOutput
from .fusion import ConcatFusion, GatedBilinearAttention
from .projectors import TextProjector, VisualProjector

__all__ = [
    "AGBANModule",
    "Batch",
    "CRFOutput",
    "ConcatFusion",
    "GatedBilinearAttention",
    "GradientReversal",
    "ModalityDiscriminator",
    "TextProjector",
    "VisualProjector",
    "adversarial_loss",
]
