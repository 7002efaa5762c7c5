"""displaCy colours of the entity labels this package's pipelines predict.

spaCy's own colours cover OntoNotes labels (PERSON, GPE, ...): of Twitter-2015's
PER, LOC, ORG and OTHER (converted to MISC) it colours only LOC and ORG, and shows
the others grey. The ``spacy_displacy_colors`` entry point (setup.cfg) hands this
table to every ``displacy.render`` once the package is installed; ``explain`` passes
it explicitly, so its reports look the same from a source checkout.
"""
from typing import Dict

ENTITY_COLOURS: Dict[str, str] = {
    "PER": "#aa9cfc",  # spaCy's PERSON
    "LOC": "#ff9561",  # spaCy's LOC
    "ORG": "#7aecec",  # spaCy's ORG
    "MISC": "#ffeb80",  # spaCy's EVENT yellow: distinct from the three above
    "OTHER": "#ffeb80",  # the data's own name for MISC (convert --type-map "")
}
