"""A tiny randomly initialised BLIP captioner saved to a folder, for the captioner tests.

Built from its ``transformers`` config (no weights are downloaded), with a BERT
tokenizer whose words are the test vocabulary's (conftest.VECTOR_WORDS): whatever it
generates is a word with a vector, so its captions become caption units in agban.
Loaded by the tests through the component's own loading code, as a user's folder.
"""
import shutil
from pathlib import Path
from typing import Any, Dict, List

from batch_support import IMAGES
from conftest import VECTOR_WORDS

#: Generation settings of the tests: short captions, greedy, fast on a CPU.
TEST_GENERATION = {"max_new_tokens": 6, "num_beams": 1}
IMAGE_NAMES = ("102.jpg", "106.jpg", "113.jpg", "130.jpg", "149.jpg")


def save_tiny_blip(folder: Path) -> Path:
    """Save a random BLIP (a 32-px ViT of one layer, a BERT decoder of one layer) and
    its processor to ``folder``."""
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    words = [w for w in VECTOR_WORDS if w not in ("is", "here")]  # content words only: each is a caption unit
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizer(str(vocab))
    tiny = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = BlipConfig(
        vision_config={**tiny, "image_size": 32, "patch_size": 16, "initializer_range": 1.0},
        text_config={**tiny, "initializer_range": 1.0, "vocab_size": len(tokenizer), "max_position_embeddings": 32,
                     "bos_token_id": tokenizer.cls_token_id, "pad_token_id": tokenizer.pad_token_id,
                     "sep_token_id": tokenizer.sep_token_id, "eos_token_id": tokenizer.sep_token_id},
        projection_dim=16, image_text_hidden_size=16,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def copy_images(folder: Path, names=IMAGE_NAMES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(IMAGES / name, folder / name)
    return folder


def captioner_config(model: Path, store: Path, image_root: Path, **changes: Any) -> Dict[str, Any]:
    return {"model": str(model), "store": str(store), "image_root": str(image_root),
            "generation": dict(TEST_GENERATION), "batch_size": 2, **changes}


class GenerateCalls:
    """Counts the images given to ``model.generate`` (wrapping the loaded model's method)."""

    def __init__(self, captioner: Any):
        self.images: List[int] = []
        original = captioner.model.generate

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.images.append(int(kwargs["pixel_values"].shape[0]))
            return original(*args, **kwargs)

        captioner.model.generate = counted

    @property
    def calls(self) -> int:
        return len(self.images)


def build_captioning_pipeline(root: Path, steps: int = 30) -> Path:
    """A tiny agban pipeline that reads captions (caption units, trained on CAPTION_POSTS)
    with an image_captioner first (the tiny BLIP above; its store: the default path,
    which the tests point at a temporary folder with SPACY_AGBAN_CACHE), saved."""
    import spacy

    from conftest import CAPTION_POSTS, make_examples, make_nlp, train

    model = save_tiny_blip(root / "tiny-blip")
    images = copy_images(root / "images")
    spacy.util.fix_random_seed(0)
    nlp = make_nlp(fusion="concat", adversarial=False)
    train(nlp, make_examples(nlp, CAPTION_POSTS), steps=steps)
    nlp.add_pipe("image_captioner", first=True,
                 config={"model": str(model), "image_root": str(images), "generation": dict(TEST_GENERATION),
                         "batch_size": 2})
    path = root / "model"
    nlp.to_disk(path)
    return path


def image_only_posts(names: List[str]) -> List[Dict[str, Any]]:
    """Posts that have an image and no caption (what users hold), ids p0, p1, ..."""
    texts = ["Kolo is here", "I love Paris", "Visiting Apple today"]
    return [{"id": f"p{i}", "text": texts[i % len(texts)], "image": name} for i, name in enumerate(names)]


def count_generate(monkeypatch) -> List[int]:
    """The number of images of each ImageCaptioner.generate call, from now on."""
    from spacy_agban.units.captioner import ImageCaptioner

    calls: List[int] = []
    original = ImageCaptioner.generate

    def counted(self, images):
        calls.append(len(images))
        return original(self, images)

    monkeypatch.setattr(ImageCaptioner, "generate", counted)
    return calls
