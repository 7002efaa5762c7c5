"""The tweet tokenizer keeps what Twitter NER data keeps whole, and says when it cannot."""
from types import SimpleNamespace

import pytest
import spacy
from spacy.util import registry

from spacy_agban.tokenizer import HYPHEN_INFIX

make_tokenizer = registry.tokenizers.get("spacy_agban.TweetTokenizer.v1")()


@pytest.fixture(scope="module")
def nlp():
    nlp = spacy.blank("en")
    nlp.tokenizer = make_tokenizer(nlp)
    return nlp


@pytest.mark.parametrize("text, tokens", [
    ("Anheuser-Busch buys a well-known co-founder's bar",
     ["Anheuser-Busch", "buys", "a", "well-known", "co-founder", "'s", "bar"]),
    ("#Chicago and @nytimes at https://t.co/x1 today",
     ["#Chicago", "and", "@nytimes", "at", "https://t.co/x1", "today"]),
    ("a 5lb Jay-Z record", ["a", "5lb", "Jay-Z", "record"]),
    ("Paris - London", ["Paris", "-", "London"]),
])
def test_tweet_tokens_stay_whole(nlp, text, tokens):
    assert [t.text for t in nlp(text)] == tokens


def test_spacys_default_rules_do_split_them():
    # the check above means something only because spaCy alone splits these
    assert len(spacy.blank("en")("Anheuser-Busch 5lb")) > 2


@pytest.mark.parametrize("rule", ["infixes", "suffixes"])
def test_a_rule_that_is_no_longer_there_is_an_error(rule):
    en = spacy.blank("en")
    infixes = [p for p in en.Defaults.infixes if p != HYPHEN_INFIX]
    suffixes = [p for p in en.Defaults.suffixes if "km" not in p]
    defaults = SimpleNamespace(
        tokenizer_exceptions=en.Defaults.tokenizer_exceptions, prefixes=en.Defaults.prefixes,
        url_match=en.Defaults.url_match,
        infixes=infixes if rule == "infixes" else en.Defaults.infixes,
        suffixes=suffixes if rule == "suffixes" else en.Defaults.suffixes,
    )
    with pytest.raises(ValueError, match="was not found"):
        make_tokenizer(SimpleNamespace(Defaults=defaults, vocab=en.vocab))
