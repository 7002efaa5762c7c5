"""A teacher's CRF tag marginals, stored with the training data for distillation.

A stronger pipeline (the teacher, e.g. ``accurate``) tags every training post once;
its per-token tag marginals (the same forward-backward the confidences come from) go
into each reference doc's ``user_data`` under :data:`TEACHER_KEY`. Training a
pipeline whose model sets ``distill > 0`` on that data adds KL(teacher || model) of
the marginals to the CRF loss: the student learns where the teacher hesitates, not
only the gold tags (docs/distillation.md).

Format (msgpack-safe, so ``DocBin(store_user_data=True)`` keeps it): ``{"tags": [tag
names in the teacher's order], "shape": [n_tokens, n_tags], "marginals": float16
bytes}``. The student maps the teacher's tags to its own by name; a doc whose tokens or
tag set differ from the student's gets no targets (its gold tags still train it).
"""
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy
from spacy.language import Language
from spacy.tokens import Doc, DocBin
from spacy.training import Example

TEACHER_KEY = "agban_teacher"


def pack_marginals(tags: Sequence[str], marginals: numpy.ndarray) -> Dict[str, Any]:
    """One doc's (n_tokens, n_tags) marginals as stored in ``user_data``."""
    marginals = numpy.asarray(marginals, dtype="float32")
    if marginals.ndim != 2 or marginals.shape[1] != len(tags):
        raise ValueError(f"marginals must be (n_tokens, {len(tags)}), got {marginals.shape}")
    return {"tags": list(tags), "shape": list(marginals.shape),
            "marginals": marginals.astype("float16").tobytes()}


def unpack_marginals(packed: Dict[str, Any], tags: Sequence[str]) -> Optional[numpy.ndarray]:
    """(n_tokens, len(tags)) float32 in the order of ``tags``, each row renormalized
    (float16 rounding); None if the teacher's tag set is not ``tags``."""
    if set(packed["tags"]) != set(tags) or len(packed["tags"]) != len(tags):
        return None
    n, k = packed["shape"]
    stored = numpy.frombuffer(packed["marginals"], dtype="float16").astype("float32").reshape(n, k)
    order = [packed["tags"].index(tag) for tag in tags]
    marginals = stored[:, order]
    return marginals / numpy.maximum(marginals.sum(axis=1, keepdims=True), 1e-6)


def example_targets(example: Example, tags: Sequence[str]) -> Optional[numpy.ndarray]:
    """The teacher's marginals for the example's predicted tokens, or None when its
    reference has none, they cover other tokens, or another tag set."""
    packed = example.reference.user_data.get(TEACHER_KEY)
    if packed is None:
        return None
    predicted, reference = example.predicted, example.reference
    if len(predicted) != len(reference) or [t.text for t in predicted] != [t.text for t in reference]:
        return None
    marginals = unpack_marginals(packed, tags)
    if marginals is None or len(marginals) != len(predicted):
        return None
    return marginals


def agban_pipe(nlp: Language) -> Any:
    """The pipeline's (first) agban component (told by its ``tag_marginals``: the pipe
    module imports this one)."""
    pipes = [(n, p) for n, p in nlp.pipeline if callable(getattr(p, "tag_marginals", None))]
    if not pipes:
        raise ValueError(f"The teacher pipeline has no agban component (components: {', '.join(nlp.pipe_names)}).")
    return pipes[0][1]


def teacher_docs(nlp: Language, references: Iterable[Doc], batch_size: int = 64) -> Iterator[Doc]:
    """Each reference doc with the teacher's marginals in ``user_data`` (the reference's
    own tokens, entities and visual context unchanged; empty docs get none)."""
    from ..extensions import copy_visual_context

    pipe = agban_pipe(nlp)
    batch: List[Doc] = []

    def flush() -> Iterator[Doc]:
        inputs = []
        for reference in batch:
            doc = Doc(nlp.vocab, words=[t.text for t in reference], spaces=[bool(t.whitespace_) for t in reference])
            copy_visual_context(reference, doc)
            inputs.append(doc)
        # the components before agban (a transformer, ...) annotate; agban itself only scores
        inputs = list(nlp.pipe(inputs, batch_size=batch_size, disable=[pipe.name]))
        for reference, marginals in zip(batch, pipe.tag_marginals(inputs)):
            if marginals is not None:
                reference.user_data[TEACHER_KEY] = pack_marginals(pipe.tags, marginals)
            yield reference
        batch.clear()

    for reference in references:
        batch.append(reference)
        if len(batch) >= batch_size:
            yield from flush()
    if batch:
        yield from flush()


def average_targets(packed: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Several teachers' stored marginals of one doc as one (their mean, in the first
    teacher's tag order: a mixture of the teachers' per-token distributions); None when
    they disagree on the tag set or the number of tokens."""
    tags = packed[0]["tags"]
    arrays = [unpack_marginals(p, tags) for p in packed]
    if any(a is None or a.shape != arrays[0].shape for a in arrays):
        return None
    return pack_marginals(tags, numpy.mean(arrays, axis=0))


def write_teacher_targets(
    teacher: Union[str, Path, Sequence[Union[str, Path]]], data: Union[str, Path], output: Union[str, Path],
    batch_size: int = 64,
) -> Dict[str, int]:
    """Tag ``data`` (a .spacy file) with ``teacher`` and write its docs, each with the
    teacher's marginals, to ``output``; returns counts. Several teachers (an ensemble,
    e.g. the seeds of one recipe): each tags every doc, one at a time (one pipeline in
    memory), and a doc keeps the mean of their marginals, or none unless all have some."""
    import spacy

    teachers = [teacher] if isinstance(teacher, (str, Path)) else list(teacher)
    if not teachers:
        raise ValueError("No teacher pipeline given.")
    references: List[Doc] = []
    per_teacher: List[List[Optional[Dict[str, Any]]]] = []
    for name in teachers:
        nlp = spacy.load(name)
        if not references:
            references = list(DocBin().from_disk(data).get_docs(nlp.vocab))
            for doc in references:  # data tagged before: only these teachers' marginals count
                doc.user_data.pop(TEACHER_KEY, None)
        per_teacher.append([doc.user_data.pop(TEACHER_KEY, None)
                            for doc in teacher_docs(nlp, references, batch_size=batch_size)])
        del nlp
    out = DocBin(store_user_data=True)
    with_targets = 0
    for i, doc in enumerate(references):
        packed = [targets[i] for targets in per_teacher]
        combined = None
        if all(p is not None for p in packed):
            combined = packed[0] if len(packed) == 1 else average_targets(packed)
        if combined is not None:
            doc.user_data[TEACHER_KEY] = combined
            with_targets += 1
        out.add(doc)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    out.to_disk(output)
    return {"docs": len(references), "with_targets": with_targets, "teachers": len(teachers)}
