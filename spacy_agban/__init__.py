"""spacy-agban: multimodal (text + image) named entity recognition for spaCy."""
from .extensions import install_extensions

install_extensions()

from . import architectures, corpus, loggers, tokenizer, visual_units  # noqa: E402,F401  (registrations)
from .pipeline import AGBANRecognizer, make_agban  # noqa: E402

__version__ = "0.1.0"
__all__ = ["AGBANRecognizer", "install_extensions", "make_agban", "__version__"]
