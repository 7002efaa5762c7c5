"""A tweet tokenizer: spaCy's English rules, keeping #hashtags, @mentions and URLs whole.

Twitter-2015 (and tweets in general) tag ``#Chicago`` or ``Anheuser-Busch`` as one
token; spaCy's default rules split them, so predicted entities could never match.
Two of spaCy's rules are dropped, found by their pattern text: the infix that splits
hyphenated words and the suffix that splits units off numbers ("5lb"). A spaCy whose
rules no longer contain them is an error rather than a tokenizer that quietly splits
again.
"""
import re
from typing import Callable, List, Sequence

from spacy.lang.char_classes import ALPHA, HYPHENS
from spacy.language import Language
from spacy.tokenizer import Tokenizer
from spacy.util import compile_infix_regex, compile_prefix_regex, compile_suffix_regex, registry

TWEET_TOKEN = re.compile(r"^(?:[#@][\w_]+|https?://\S+|www\.\S+)$", re.UNICODE)
# spaCy's English infix for "word-word" (spacy/lang/punctuation.py builds it this way)
HYPHEN_INFIX = r"(?<=[{a}0-9])(?:{h})(?=[{a}])".format(a=ALPHA, h=HYPHENS)


@registry.tokenizers("spacy_agban.TweetTokenizer.v1")
def create_tweet_tokenizer() -> Callable[[Language], Tokenizer]:
    def make(nlp: Language) -> Tokenizer:
        defaults = nlp.Defaults
        infixes = drop_rule(defaults.infixes, lambda p: p == HYPHEN_INFIX, "infix splitting hyphenated words")
        suffixes = drop_rule(defaults.suffixes, splits_units, "suffix splitting units off numbers")
        return Tokenizer(
            nlp.vocab,
            rules=defaults.tokenizer_exceptions,
            prefix_search=compile_prefix_regex(defaults.prefixes).search,
            suffix_search=compile_suffix_regex(suffixes).search,
            infix_finditer=compile_infix_regex(infixes).finditer,
            token_match=TWEET_TOKEN.match,
            url_match=defaults.url_match,
        )

    return make


def drop_rule(patterns: Sequence[str], is_rule: Callable[[str], bool], what: str) -> List[str]:
    """``patterns`` without the rule; an error naming it when it is not there."""
    kept = [p for p in patterns if not is_rule(p)]
    if len(kept) == len(patterns):
        raise ValueError(
            f"spacy_agban.TweetTokenizer.v1: spaCy's English {what} was not found in this "
            "spaCy version's rules, so the tokenizer cannot drop it and would split tokens that "
            "Twitter NER data keeps whole. Install the spaCy version pinned by spacy-agban."
        )
    return kept


def splits_units(pattern: str) -> bool:
    # "5lb" stays one token, as the data has it
    return pattern.startswith(r"(?<=[0-9])(?:") and "km" in pattern
