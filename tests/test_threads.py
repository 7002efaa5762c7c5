"""nlp.pipe(n_process=2) after the same process has tagged: returns, in a fresh
interpreter with the environment a user has (no OMP_NUM_THREADS), under a timeout
so that a hang fails the test instead of the suite."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import numpy, spacy
    from spacy.training import Example
    import spacy_agban  # noqa: F401

    nlp = spacy.blank("en")
    nlp.vocab.reset_vectors(width=8)
    rng = numpy.random.default_rng(0)
    for word in ("obama", "visited", "boston", "love", "paris", "a", "man"):
        nlp.vocab.set_vector(word, rng.normal(size=8).astype("float32"))
    nlp.add_pipe("agban")
    examples = [
        Example.from_dict(nlp.make_doc("Obama visited Boston"), {"entities": [(0, 5, "PER"), (14, 20, "LOC")]}),
        Example.from_dict(nlp.make_doc("I love Paris"), {"entities": [(7, 12, "LOC")]}),
    ]
    nlp.initialize(lambda: examples)
    list(nlp.pipe([nlp.make_doc("Obama in Paris")]))  # one post first, as a user tries
    docs = [nlp.make_doc(t) for t in ("Obama visited Boston", "I love Paris", "Hello world")]
    out = list(nlp.pipe(docs, n_process=2))
    print("tagged", len(out), [len(doc) for doc in out])
""")

#: Without the fix the script never returns; with it, it takes seconds (tens under load).
TIMEOUT = 240


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="n_process forks on Linux only")
@pytest.mark.timeout(TIMEOUT + 30)
def test_n_process_2_after_a_first_call_returns() -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    # Its own session: on a timeout the hung workers go too, not only their parent.
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"nlp.pipe(n_process=2) did not return within {TIMEOUT} s (a hang)")
    assert proc.returncode == 0, stderr[-3000:]
    assert "tagged 3 [3, 3, 2]" in stdout
