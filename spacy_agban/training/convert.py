"""UMT-style CoNLL (``IMGID:`` lines, then ``token<TAB>tag``) -> spaCy DocBin."""
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from spacy.tokens import Doc, DocBin
from spacy.training import biluo_tags_to_spans, iob_to_biluo
from spacy.vocab import Vocab


IMGID_PREFIX = "IMGID:"
TAG_PREFIXES = ("B-", "I-")


class ConversionError(ValueError):
    """A malformed input line; the message starts with ``file:line``."""


@dataclass
class Tweet:
    image_id: str
    words: List[str] = field(default_factory=list)
    tags: List[str] = field(default_factory=list)
    line: int = 0


@dataclass
class ConversionStats:
    tweets: int = 0
    tokens: int = 0
    entities: Counter = field(default_factory=Counter)
    orphan_inside: int = 0  # I- tags with no B- before them (conlleval starts an entity)
    with_caption: int = 0


def _fail(path: Path, line: int, reason: str) -> ConversionError:
    return ConversionError(f"{path}:{line}: {reason}")


def read_conll(path: Path) -> Iterator[Tweet]:
    """Yield tweets; a malformed line raises ConversionError with ``file:line``."""
    current: Optional[Tweet] = None
    with path.open(encoding="utf8") as lines:
        for number, raw in enumerate(lines, start=1):
            line = raw.rstrip("\r\n")
            if line.startswith(IMGID_PREFIX):
                if current is not None and current.words:
                    yield current
                image_id = line[len(IMGID_PREFIX):].strip()
                if not image_id:
                    raise _fail(path, number, "IMGID: line without an image id")
                current = Tweet(image_id=image_id, line=number)
            elif not line.strip():
                if current is not None and current.words:
                    yield current
                    current = None
            else:
                if current is None:
                    raise _fail(path, number, "token line before any IMGID: line")
                parts = line.split("\t")
                if len(parts) != 2 or not parts[0]:
                    raise _fail(path, number, f"expected 'token<TAB>tag', got {line!r}")
                # the token is kept as written (one is a lone no-break space): no data lost
                word, tag = parts[0], parts[1].strip()
                if tag != "O" and (tag[:2] not in TAG_PREFIXES or len(tag) < 3):
                    raise _fail(path, number, f"tag {tag!r} is not O, B-TYPE or I-TYPE")
                current.words.append(word)
                current.tags.append(tag)
    if current is not None and current.words:
        yield current


def read_captions(path: Path) -> Dict[str, str]:
    """``<id>.jpg :<caption>`` lines -> {image file name: caption}."""
    captions: Dict[str, str] = {}
    with path.open(encoding="utf8") as lines:
        for number, raw in enumerate(lines, start=1):
            line = raw.strip()
            if not line:
                continue
            name, sep, caption = line.partition(" :")
            if not sep or not name:
                raise _fail(path, number, f"expected '<id>.jpg :<caption>', got {line!r}")
            captions[name.strip()] = caption.strip()
    return captions


def rename_types(tags: List[str], mapping: Dict[str, str]) -> List[str]:
    return [t if t == "O" else t[:2] + mapping.get(t[2:], t[2:]) for t in tags]


def count_orphans(tags: List[str]) -> int:
    """I-X tags that follow neither B-X nor I-X (conlleval begins an entity there)."""
    orphans, previous = 0, "O"
    for tag in tags:
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            orphans += 1
        previous = tag
    return orphans


def tweet_to_doc(
    vocab: Vocab, tweet: Tweet, captions: Dict[str, str], type_map: Dict[str, str]
) -> Doc:
    words = tweet.words
    doc = Doc(vocab, words=words, spaces=[True] * (len(words) - 1) + [False])
    tags = rename_types(tweet.tags, type_map)
    doc.ents = biluo_tags_to_spans(doc, iob_to_biluo(tags))
    image = f"{tweet.image_id}.jpg"
    doc._.image = image
    doc._.image_caption = captions.get(image)
    doc.user_data["image_id"] = tweet.image_id
    return doc


def convert_file(
    source: Path,
    output: Path,
    captions: Dict[str, str],
    type_map: Dict[str, str],
) -> ConversionStats:
    vocab = Vocab()
    docbin = DocBin(store_user_data=True)
    stats = ConversionStats()
    for tweet in read_conll(source):
        doc = tweet_to_doc(vocab, tweet, captions, type_map)
        docbin.add(doc)
        stats.tweets += 1
        stats.tokens += len(doc)
        stats.entities.update(ent.label_ for ent in doc.ents)
        stats.orphan_inside += count_orphans(tweet.tags)
        stats.with_caption += doc._.image_caption is not None
    output.parent.mkdir(parents=True, exist_ok=True)
    docbin.to_disk(output)
    return stats


def parse_type_map(spec: str) -> Dict[str, str]:
    """``"OTHER=MISC,FOO=BAR"`` -> mapping; an empty string maps nothing."""
    mapping = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise ValueError(f"type map entries look like OLD=NEW, got {item!r}")
        mapping[old] = new
    return mapping


def format_stats(rows: List[Tuple[str, ConversionStats]]) -> str:
    types = sorted({t for _, s in rows for t in s.entities})
    header = ["split", "tweets", "tokens", "entities", *types, "orphan I-", "captions"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, s in rows:
        cells = [name, s.tweets, s.tokens, sum(s.entities.values()),
                 *(s.entities[t] for t in types), s.orphan_inside, s.with_caption]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)
