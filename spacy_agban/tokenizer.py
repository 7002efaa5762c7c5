"""A tweet tokenizer: spaCy's English rules, keeping #hashtags, @mentions and URLs whole.

Twitter-2015 (and tweets in general) tag ``#Chicago`` or ``Anheuser-Busch`` as one
token; spaCy's default rules split them, so predicted entities could never match.
"""
import re
from typing import Callable

from spacy.lang.char_classes import ALPHA, HYPHENS
from spacy.language import Language
from spacy.tokenizer import Tokenizer
from spacy.util import compile_infix_regex, compile_prefix_regex, compile_suffix_regex, registry

TWEET_TOKEN = re.compile(r"^(?:[#@][\w_]+|https?://\S+|www\.\S+)$", re.UNICODE)
_HYPHEN_INFIX = r"(?<=[{a}0-9])(?:{h})(?=[{a}])".format(a=ALPHA, h=HYPHENS)


@registry.tokenizers("spacy_agban.TweetTokenizer.v1")
def create_tweet_tokenizer() -> Callable[[Language], Tokenizer]:
    def make(nlp: Language) -> Tokenizer:
        defaults = nlp.Defaults
        infixes = [p for p in defaults.infixes if p != _HYPHEN_INFIX and "{h}" not in p]
        infixes = [p for p in infixes if not _splits_hyphens(p)]
        suffixes = [p for p in defaults.suffixes if not _splits_units(p)]
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


def _splits_hyphens(pattern: str) -> bool:
    return any(h in pattern for h in ("-|–|—", "--"))


def _splits_units(pattern: str) -> bool:
    # "5lb" stays one token, as the data has it
    return pattern.startswith(r"(?<=[0-9])(?:") and "km" in pattern
