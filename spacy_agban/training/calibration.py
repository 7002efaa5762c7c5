"""How far to trust an entity's confidence: a reliability table.

The agban pipe gives each predicted entity a confidence (its least sure token's CRF
marginal probability of the decoded tag). A confidence is calibrated when, of the
entities given about 0.8, about 80% are right. The table bins the predicted entities of
a DocBin by confidence and shows the observed precision of each bin (an entity is right
when a gold entity has its exact characters and label, as spaCy's NER scorer counts).
"""
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple, Union

from spacy.language import Language
from spacy.training import Example

from .evaluation import WITH_CONTEXT, WITHOUT_CONTEXT, make_examples

Outcome = Tuple[float, bool]  # (confidence, right)


def entity_outcomes(examples: Iterable[Example]) -> List[Outcome]:
    """(confidence, right) of every predicted entity of the examples' predicted docs."""
    outcomes = []
    for eg in examples:
        gold = {(e.start_char, e.end_char, e.label_) for e in eg.reference.ents}
        for ent in eg.predicted.ents:
            confidence = ent._.agban_confidence
            if confidence is None:
                raise ValueError(
                    "a predicted entity has no confidence: run the pipeline with the agban "
                    "component's store_confidence = true"
                )
            outcomes.append((confidence, (ent.start_char, ent.end_char, ent.label_) in gold))
    return outcomes


def reliability_table(outcomes: Sequence[Outcome], bins: int = 10) -> List[Dict[str, float]]:
    """One row per equal-width confidence bin over [0, 1] that holds entities: its bounds,
    the number of entities, their mean confidence and the share of them that is right."""
    if bins < 1:
        raise ValueError(f"the reliability table needs at least one bin, got {bins}")
    grouped: List[List[Outcome]] = [[] for _ in range(bins)]
    for confidence, right in outcomes:
        grouped[min(int(confidence * bins), bins - 1)].append((confidence, right))
    return [
        {
            "low": i / bins, "high": (i + 1) / bins, "entities": len(group),
            "mean_confidence": sum(c for c, _ in group) / len(group),
            "precision": sum(r for _, r in group) / len(group),
        }
        for i, group in enumerate(grouped) if group
    ]


def expected_calibration_error(rows: Sequence[Dict[str, float]]) -> float:
    """The entity-weighted mean gap between a bin's mean confidence and its precision."""
    total = sum(row["entities"] for row in rows)
    if not total:
        return 0.0
    return sum(row["entities"] * abs(row["mean_confidence"] - row["precision"]) for row in rows) / total


def format_reliability(rows: Sequence[Dict[str, float]], title: str = "") -> str:
    """The table in Markdown, with the expected calibration error under it."""
    lines = [f"**{title}**", ""] if title else []
    lines += ["| confidence | entities | mean confidence | precision |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['low']:.1f}-{row['high']:.1f} | {row['entities']} | "
                     f"{row['mean_confidence']:.3f} | {row['precision']:.3f} |")
    lines += ["", f"Expected calibration error: {expected_calibration_error(rows):.3f} "
                  f"({sum(row['entities'] for row in rows)} predicted entities)"]
    return "\n".join(lines)


def reliability_both(
    nlp: Language, path: Union[str, Path], bins: int = 10, batch_size: int = 64, component: str = "agban"
) -> Dict[str, List[Dict[str, float]]]:
    """Reliability tables with the stored visual context and with it removed."""
    pipe = nlp.get_pipe(component)
    stored, pipe.store_confidence = pipe.store_confidence, True
    try:
        result = {}
        for key, visual_context in ((WITH_CONTEXT, True), (WITHOUT_CONTEXT, False)):
            examples = make_examples(nlp, path, visual_context)
            predicted = nlp.pipe((eg.predicted for eg in examples), batch_size=batch_size)
            done = [Example(doc, eg.reference) for doc, eg in zip(predicted, examples)]
            result[key] = reliability_table(entity_outcomes(done), bins)
        return result
    finally:
        pipe.store_confidence = stored
