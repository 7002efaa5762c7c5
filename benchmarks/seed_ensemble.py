"""What a seed ensemble would score: entity spans kept when most of N trained pipelines
predict them (same start, end and label), on dev and test, both evaluation columns
(visual context given / removed).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python -m benchmarks.seed_ensemble \
        training/lr/accurate_lr3e-5_avg-s0/model-best training/lr/accurate_lr3e-5_avg-s1/model-best \
        training/lr/accurate_lr3e-5_avg-s2/model-best

Span voting needs nothing from the members but their entities, so pipelines trained
apart combine as they are; with an odd number of members two kept spans can never
overlap (each member votes for at most one of them). The cost at tagging is one
pipeline run per member. Each member's predictions are stored in ``--output`` by
model, split and column, so a stopped run goes on where it stopped and members can be
added one at a time; the members' own F1 is reported beside the ensemble's as a check
against their recorded scores.
"""
import os
import statistics
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import srsly  # noqa: E402
import typer  # noqa: E402

from . import decoding_choice  # noqa: E402
from .paths import ROOT, relative  # noqa: E402

if TYPE_CHECKING:
    from spacy.language import Language

app = typer.Typer(add_completion=False)
COLUMNS = decoding_choice.COLUMNS
Span = Tuple[int, int, str]  # start character, end character, label: the pipelines' tokens may differ from the references'


def predict(model: Path, data: Path, visual_context: bool, batch_size: int = 64) -> List[List[Span]]:
    """The pipeline's entities for every post of ``data``, in order."""
    import spacy

    import spacy_agban  # noqa: F401
    from spacy_agban.training.docs_io import fresh_doc, read_references

    nlp = spacy.load(model)
    docs = (fresh_doc(nlp, ref, visual_context) for ref in read_references(nlp, data))
    return [[(e.start_char, e.end_char, e.label_) for e in doc.ents] for doc in nlp.pipe(docs, batch_size=batch_size)]


def vote(members: Sequence[List[List[Span]]], min_votes: int) -> List[List[Span]]:
    """Per post, the spans at least ``min_votes`` members predicted, most votes first where
    kept spans would overlap (possible only with an even number of members)."""
    result = []
    for per_member in zip(*members, strict=True):
        counts = Counter(tuple(span) for spans in per_member for span in spans)
        kept: List[Span] = []
        taken: set = set()
        for span, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
            tokens = set(range(span[0], span[1]))
            if n >= min_votes and not tokens & taken:
                kept.append(span)
                taken |= tokens
        result.append(sorted(kept))
    return result


def score(data: Path, predicted: List[List[Span]], nlp: Optional["Language"] = None) -> Dict[str, float]:
    """spaCy's NER precision, recall and F1 of the spans against ``data``'s references, the
    predicted docs tokenized by ``nlp`` (the members' pipeline) as ``spacy evaluate`` does."""
    import spacy
    from spacy.scorer import get_ner_prf
    from spacy.training import Example

    import spacy_agban  # noqa: F401
    from spacy_agban.training.docs_io import read_references

    nlp = nlp or spacy.blank("en")
    examples = []
    for ref, spans in zip(read_references(nlp, data), predicted, strict=True):
        doc = nlp.make_doc(ref.text)
        ents = [doc.char_span(start, end, label=label) for start, end, label in spans]
        if any(ent is None for ent in ents):
            raise ValueError(f"a predicted span does not fall on token boundaries in {ref.text!r}: "
                             "score with the pipeline that predicted it")
        doc.ents = ents
        examples.append(Example(doc, ref))
    scores = get_ner_prf(examples)
    return {k: 100 * scores[k] for k in ("ents_p", "ents_r", "ents_f")}


def report(table: List[Tuple[str, str, Dict[str, Dict[str, float]]]]) -> str:
    lines = ["| split | predictor | P | R | F1 | F1, context removed |", "|---|---|---|---|---|---|"]
    for split, name, scores in table:
        with_, without = scores["with_context"], scores["without_context"]
        lines.append(f"| {split} | {name} | {with_['ents_p']:.2f} | {with_['ents_r']:.2f} | "
                     f"{with_['ents_f']:.2f} | {without['ents_f']:.2f} |")
    return "\n".join(lines) + "\n"


@app.command()
def main(
    models: List[Path] = typer.Argument(..., help="Trained pipelines (model-best folders), an odd number"),
    splits: str = typer.Option("dev,test", help="Comma-separated corpus/<split>.spacy to score"),
    corpus: Path = typer.Option(ROOT / "corpus", help="Folder of the DocBins"),
    output: Path = typer.Option(ROOT / "training" / "ensemble" / "predictions.json",
                                help="Members' predicted spans, merged by model, split and column"),
    report_path: Path = typer.Option(ROOT / "metrics" / "ensemble.md", "--report", help="Markdown table"),
) -> None:
    """Majority vote of the members' entity spans, scored beside each member."""
    if len(models) < 3 or len(models) % 2 == 0:
        raise typer.BadParameter("give an odd number of pipelines, at least 3, so that a majority exists")
    for model in models:
        if not (model / "config.cfg").exists():
            raise typer.BadParameter(f"{model} is not a saved spaCy pipeline (no config.cfg)")
    import spacy

    import spacy_agban  # noqa: F401

    # the members come from one config: the first one's tokenizer is theirs
    nlp = spacy.load(models[0])
    stored: Dict = srsly.read_json(output) if output.exists() else {}
    output.parent.mkdir(parents=True, exist_ok=True)
    table = []
    for split in splits.split(","):
        data = corpus / f"{split}.spacy"
        members: Dict[str, Dict[str, List[List[Span]]]] = {}
        for model in models:
            key = relative(model)
            for column in COLUMNS:
                cached = stored.setdefault(key, {}).setdefault(split, {})
                if column not in cached:
                    typer.echo(f"predicting {key} {split} {column}")
                    cached[column] = predict(model, data, column == "with_context")
                    srsly.write_json(output, stored)  # after each column: a stopped run goes on here
            members[key] = {c: [[tuple(s) for s in doc] for doc in stored[key][split][c]] for c in COLUMNS}
        singles = []
        for key, predicted in members.items():
            scores = {c: score(data, predicted[c], nlp) for c in COLUMNS}
            singles.append(scores)
            table.append((split, f"`{key}`", scores))
        mean = {c: {k: statistics.mean(s[c][k] for s in singles) for k in ("ents_p", "ents_r", "ents_f")}
                for c in COLUMNS}
        table.append((split, "members' mean", mean))
        majority = len(models) // 2 + 1
        ensemble = {c: score(data, vote([m[c] for m in members.values()], majority), nlp) for c in COLUMNS}
        table.append((split, f"**majority vote ({majority} of {len(models)})**", ensemble))
    text = report(table)
    report_path.write_text(
        "# Seed ensemble: entity spans most members predict\n\n" + text
        + "\nRe-run: `HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python -m benchmarks.seed_ensemble MODEL...`"
        " (predictions are cached in `" + relative(output) + "`).\n", encoding="utf-8")
    typer.echo(text)


if __name__ == "__main__":
    app()
