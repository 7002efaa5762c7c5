"""The words of a caption, read the same way by every caption unit source."""
from typing import List

from spacy.lang.en.stop_words import STOP_WORDS

#: Stripped from both ends of each whitespace-separated word of a caption.
PUNCTUATION = ".,;:!?\"'()[]{}"


def caption_words(caption: str, max_chars: int) -> List[str]:
    """The words of the caption's first ``max_chars`` characters: split at whitespace,
    punctuation stripped from both ends, empty words dropped, case kept."""
    words = (raw.strip(PUNCTUATION) for raw in caption[:max_chars].split())
    return [word for word in words if word]


def is_content_word(word: str) -> bool:
    """Whether a lowercase caption word can stand for what the image shows: letters
    only (no numbers, no handles) and not a stop word."""
    return word.isalpha() and word not in STOP_WORDS


def content_words(caption: str, max_chars: int) -> List[str]:
    """The caption's content words, lowercased, each once, in caption order."""
    found: List[str] = []
    for word in caption_words(caption, max_chars):
        lower = word.lower()
        if is_content_word(lower) and lower not in found:
            found.append(lower)
    return found
