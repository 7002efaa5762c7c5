"""displaCy colours: every label the data gives a pipeline has one, through spaCy's entry point
(any ``displacy.render``) and in the explain report."""
import pytest
import spacy
from spacy import displacy
from spacy.tokens import Span
from spacy.util import registry

from conftest import ASSETS
from spacy_agban.cli.explain import Explanation, render_html
from spacy_agban.colours import ENTITY_COLOURS
from spacy_agban.training.convert import parse_type_map, read_conll, rename_types

CONVERT_DEFAULT_TYPE_MAP = "OTHER=MISC"  # the convert command's default


def data_labels(type_map: str) -> set:
    mapping = parse_type_map(type_map)
    return {tag[2:] for split in ("train", "valid", "test") for tweet in read_conll(ASSETS / f"{split}.txt")
            for tag in rename_types(tweet.tags, mapping) if tag != "O"}


def doc_with_every_label(labels):
    nlp = spacy.blank("en")
    doc = nlp.make_doc(" ".join(f"word{i}" for i in range(len(labels))))
    doc.ents = [Span(doc, i, i + 1, label=label) for i, label in enumerate(sorted(labels))]
    return doc


@pytest.mark.parametrize("type_map", [CONVERT_DEFAULT_TYPE_MAP, ""], ids=["converted", "as-in-the-data"])
def test_no_label_without_a_displacy_colour(type_map):
    labels = data_labels(type_map)
    assert {"PER", "LOC", "ORG"} < labels  # the control: the labels were read
    installed = {}
    for colours in registry.displacy_colors.get_all().values():  # what displacy.render reads
        installed.update(colours() if callable(colours) else colours)
    assert labels <= set(installed), f"no colour for {labels - set(installed)}"
    html = displacy.render(doc_with_every_label(labels), style="ent", page=False)
    for label in labels:
        assert f"background: {installed[label]}" in html


def test_explain_shows_the_same_colours_and_each_entity_s_confidence():
    doc = doc_with_every_label(data_labels(CONVERT_DEFAULT_TYPE_MAP))
    page = render_html(Explanation(name="post", doc=doc, units=[], attention=None, gate=None))
    for ent in doc.ents:
        assert page.count(ENTITY_COLOURS[ent.label_]) >= 2  # displaCy's mark and the table
    assert "<th>confidence</th>" in page and "n/a" in page  # this doc's entities were not scored

