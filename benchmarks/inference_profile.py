"""Where agban's inference time goes, and the batched featurizer/Viterbi against the old path.

    python -m benchmarks.inference_profile training/runs/agban-s0/model-best

1. cProfile of ``nlp.pipe`` over the test docs: the functions with the most own time.
2. Before/after in one process, interleaved: the same pipeline with the per-token
   featurizer and pytorch-crf's decode (the code before the change, kept here as
   :func:`per_token_arrays`) against the current batched featurizer and Viterbi.
"""
import cProfile
import io
import pstats
import statistics
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy
import srsly
import typer

from spacy_agban.docs_io import read_fresh_docs
from spacy_agban.featurize import Featurizer, char_ids, static_vectors
from spacy_agban.model.crf import CRFOutput

from .machine import machine, machine_line
from .speed import ROOT, load, time_pipe

app = typer.Typer(add_completion=False)


def per_token_arrays(featurizer: Featurizer, docs: Sequence, units: Sequence,
                     tags: Optional[Sequence[Sequence[int]]] = None) -> Dict[str, object]:
    """The featurizer's arrays built token by token in Python (the code before batching)."""
    n_docs, max_len = len(docs), max(len(doc) for doc in docs)
    width, n_chars = featurizer.static_width, featurizer.max_word_chars
    word_ids = numpy.zeros((n_docs, max_len), dtype="int64")
    vectors = numpy.zeros((n_docs, max_len, width), dtype="float32")
    chars = numpy.zeros((n_docs, max_len, n_chars), dtype="int64")
    char_lengths = numpy.zeros((n_docs, max_len), dtype="int64")
    token_mask = numpy.zeros((n_docs, max_len), dtype="bool")
    gold = numpy.zeros((n_docs, max_len), dtype="int64")
    for i, doc in enumerate(docs):
        token_mask[i, : len(doc)] = True
        vectors[i, : len(doc)] = static_vectors(doc, width)
        for j, token in enumerate(doc):
            word_ids[i, j] = featurizer.word_row(token.lower_)
            ids = char_ids(token.text, n_chars)
            chars[i, j, : len(ids)] = ids
            char_lengths[i, j] = len(ids)
        if tags is not None:
            gold[i, : len(doc)] = tags[i]
    arrays: Dict[str, object] = {
        "word_ids": word_ids, "static_vectors": vectors, "char_ids": chars,
        "char_lengths": char_lengths, "token_mask": token_mask,
        "tags": gold if tags is not None else None,
    }
    arrays["units"], arrays["unit_masks"] = featurizer.unit_arrays(units)
    return arrays


class PerTokenFeaturizer(Featurizer):
    def __call__(self, docs, units, tags=None):
        return per_token_arrays(self, docs, units, tags)


@contextmanager
def old_inference_path(nlp) -> Iterator[None]:
    """Swap in the per-token featurizer and pytorch-crf's decode, then restore."""
    model = nlp.get_pipe("agban").model
    new_featurizer = model.attrs["featurizer"]
    old = PerTokenFeaturizer(new_featurizer.words, new_featurizer.static_width,
                             new_featurizer.unit_dims, new_featurizer.max_word_chars)
    new_decode = CRFOutput.decode
    model.attrs["featurizer"] = old
    CRFOutput.decode = lambda self, features, mask: self.crf.decode(self.scores(features), mask=mask)
    try:
        yield
    finally:
        model.attrs["featurizer"] = new_featurizer
        CRFOutput.decode = new_decode


def top_functions(nlp, docs: List, n: int = 15) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    time_pipe(nlp, docs)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(n)
    return out.getvalue()


@app.command()
def main(
    model: str = typer.Argument("training/runs/agban-s0/model-best"),
    test: Path = typer.Option(ROOT / "corpus" / "test.spacy"),
    limit: int = typer.Option(1000, help="First N test docs (0: all)"),
    reps: int = typer.Option(5),
    output: Path = typer.Option(ROOT / "metrics" / "inference_profile.json"),
) -> None:
    """Profile agban inference; time the old and new featurizer/decode interleaved."""
    nlp = load(model)
    docs = read_fresh_docs(nlp, test, limit)
    words = sum(len(d) for d in docs)
    with old_inference_path(nlp):
        before_profile = top_functions(nlp, docs)
    after_profile = top_functions(nlp, docs)
    seconds: Dict[str, List[float]] = {"before": [], "after": []}
    time_pipe(nlp, docs[:16])
    for _ in range(reps):
        with old_inference_path(nlp):
            seconds["before"].append(time_pipe(nlp, docs))
        seconds["after"].append(time_pipe(nlp, docs))
    result = {
        "machine": machine(), "model": model, "docs": len(docs), "words": words,
        "seconds": seconds,
        "words_per_s": {k: words / statistics.median(v) for k, v in seconds.items()},
        "profile_before": before_profile, "profile_after": after_profile,
    }
    srsly.write_json(output, result)
    typer.echo(f"{machine_line(result['machine'])}\n{len(docs)} docs, {words} words")
    typer.echo(f"before (per-token featurizer, pytorch-crf decode): {result['words_per_s']['before']:.0f} words/s")
    typer.echo(f"after (batched featurizer and Viterbi): {result['words_per_s']['after']:.0f} words/s")
    typer.echo("--- profile before ---\n" + before_profile)
    typer.echo("--- profile after ---\n" + after_profile)


if __name__ == "__main__":
    app()
