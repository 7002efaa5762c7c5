"""spacy-agban: multimodal (text + image) named entity recognition for spaCy."""
from .extensions import install_extensions

# The one place the Doc extensions are registered: every module of the package runs
# this first, and so does every process that uses it (a forked worker inherits them;
# a spawned or Ray worker imports the package to unpickle what it runs), before a
# DocBin is read or a doc gets its image (the values come back only onto registered
# extensions).
install_extensions()

from . import architectures, corpus, int8, loggers, tokenizer, visual_units  # noqa: E402,F401  (registrations)
from .pipeline import AGBANRecognizer, make_agban  # noqa: E402

__version__ = "0.1.0"
__all__ = ["AGBANRecognizer", "install_extensions", "make_agban", "__version__"]
