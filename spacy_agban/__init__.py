"""spacy-agban: multimodal (text + image) named entity recognition for spaCy."""
from .extensions import install_extensions
from .threads import install_fork_guard

# The one place the Doc extensions are registered: every module of the package runs
# this first, and so does every process that uses it (a forked worker inherits them;
# a spawned or Ray worker imports the package to unpickle what it runs), before a
# DocBin is read or a doc gets its image (the values come back only onto registered
# extensions).
install_extensions()
# nlp.pipe(n_process > 1) forks: each child runs torch on one thread (see threads.py).
install_fork_guard()

from .pipeline import AGBANRecognizer, make_agban  # noqa: E402

__version__ = "0.1.0"
__all__ = ["AGBANRecognizer", "install_extensions", "make_agban", "__version__"]
