"""The one switch between the fast prediction paths and the code they replace.

The fast paths (numpy copies of the char BiLSTM and of the CRF's Viterbi, the
length-sorted transformer encoding, the shim's cached prediction) give the same
predictions as the plain torch code for less work. Inside :func:`reference_inference`
every one of them takes the plain path instead: the tests that check the fast paths
change no prediction use it, and so does side-by-side timing.
"""
from contextlib import contextmanager
from typing import Iterator

_REFERENCE = False


def use_reference() -> bool:
    """True inside :func:`reference_inference`."""
    return _REFERENCE


@contextmanager
def reference_inference() -> Iterator[None]:
    """Run prediction through the replaced (slower) code paths."""
    global _REFERENCE
    previous, _REFERENCE = _REFERENCE, True
    try:
        yield
    finally:
        _REFERENCE = previous
