"""Detectors with random weights: same boxes as torchvision's own forward, right features."""
from collections import OrderedDict
from pathlib import Path
from typing import List

import numpy
import pytest
import torch
from PIL import Image
from spacy.util import registry
from torchvision.models.detection.transform import resize_boxes
from torchvision.transforms.functional import to_tensor

from spacy_agban.detection.detector import (
    RandomWeightsWarning,
    make_fasterrcnn_mobilenet_detector,
    make_mask_rcnn_detector,
    signature_key,
)

IMAGES = Path(__file__).resolve().parents[2] / "assets" / "twitter2015" / "images"
# Small input, threshold 0 (random weights score low), 100 RPN proposals: the box
# head on 1000 proposals costs ~25 GFLOP per image whatever the input size.
SMALL = dict(weights=None, score_threshold=0.0, min_size=128, max_size=160, device="cpu", proposals=100)


def small_images(names=("102", "106", "113"), side: int = 200) -> List[Image.Image]:
    images = []
    for name in names:
        image = Image.open(IMAGES / f"{name}.jpg").convert("RGB")
        image.thumbnail((side, side))
        images.append(image)
    return images


@pytest.fixture(scope="module")
def maskrcnn():
    torch.manual_seed(0)
    with pytest.warns(RandomWeightsWarning, match="RANDOM weights"):
        return make_mask_rcnn_detector(top_k=3, batch_size=2, **SMALL)


@pytest.fixture(scope="module")
def mobilenet():
    torch.manual_seed(0)
    with pytest.warns(RandomWeightsWarning):
        return make_fasterrcnn_mobilenet_detector(top_k=3, batch_size=2, **SMALL)


def test_registered_names() -> None:
    assert registry.misc.get("spacy_agban.MaskRCNNDetector.v1") is make_mask_rcnn_detector
    assert registry.misc.get("spacy_agban.FasterRCNNMobileNetDetector.v1") is make_fasterrcnn_mobilenet_detector


def test_threshold_and_sizes_reach_the_model(maskrcnn) -> None:
    assert maskrcnn.model.roi_heads.score_thresh == 0.0
    assert maskrcnn.model.transform.min_size == (128,) and maskrcnn.model.transform.max_size == 160
    assert not maskrcnn.model.training


def test_top_k_boxes_equal_torchvisions_forward(maskrcnn) -> None:
    # Two same-size images form one batch, exactly as model(images) batches them;
    # a differently sized one runs alone, as model([image]) does.
    pair = [im.resize((200, 150)) for im in small_images(("102", "106"))]
    other = small_images(("113",))[0]
    assert other.size != (200, 150)
    ours = maskrcnn(pair + [other])
    with torch.inference_mode():
        theirs = maskrcnn.model([to_tensor(im) for im in pair]) + maskrcnn.model([to_tensor(other)])
    for det, ref in zip(ours, theirs):
        assert len(det) == 3
        assert torch.equal(torch.from_numpy(det.boxes), ref["boxes"][:3])
        assert torch.equal(torch.from_numpy(det.scores), ref["scores"][:3])
        assert det.labels == [maskrcnn.categories[i] for i in ref["labels"][:3].tolist()]
        assert list(det.scores) == sorted(det.scores, reverse=True)


def test_boxes_are_in_original_coordinates(maskrcnn) -> None:
    image = small_images(("102",), side=400)[0]  # larger than max_size=160
    (det,) = maskrcnn([image])
    width, height = image.size
    assert (det.boxes[:, [0, 2]] <= width + 1e-3).all() and (det.boxes[:, [1, 3]] <= height + 1e-3).all()
    assert det.boxes[:, 2:].max() > 160  # not in the resized input's coordinates


def recompute_feature(detector, image: Image.Image, boxes: numpy.ndarray) -> numpy.ndarray:
    """The box-head feature of given boxes, by hand from torchvision's parts."""
    model = detector.model
    with torch.inference_mode():
        tensor = to_tensor(image)
        image_list, _ = model.transform([tensor])
        size = image_list.image_sizes[0]
        scaled = resize_boxes(torch.from_numpy(boxes), list(tensor.shape[-2:]), list(size))
        features = model.backbone(image_list.tensors)
        features = features if isinstance(features, OrderedDict) else OrderedDict([("0", features)])
        pooled = model.roi_heads.box_roi_pool(features, [scaled], [size])
        return model.roi_heads.box_head(pooled).numpy()


def test_features_are_the_box_head_of_the_final_boxes(maskrcnn) -> None:
    image = small_images(("106",))[0]
    (det,) = maskrcnn([image])
    assert det.features.shape == (3, 1024) and det.features.dtype == numpy.float32
    assert numpy.isfinite(det.features).all()
    assert not numpy.allclose(det.features[0], det.features[1])  # one feature per box
    expected = recompute_feature(maskrcnn, image, det.boxes)
    numpy.testing.assert_allclose(det.features, expected, rtol=1e-4, atol=1e-5)
    # ... and a feature for a different (e.g. unscaled) box would not match.
    wrong = recompute_feature(maskrcnn, image, det.boxes * 0.5)
    assert not numpy.allclose(det.features, wrong, atol=1e-4)


def test_same_result_whatever_the_batch_order(maskrcnn) -> None:
    images = small_images(("102", "113"))
    forward = maskrcnn(images)
    backward = maskrcnn(images[::-1])[::-1]
    for a, b in zip(forward, backward):
        assert a.labels == b.labels
        numpy.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
        numpy.testing.assert_allclose(a.features, b.features, atol=1e-4)


def test_tiny_and_flat_images_do_not_crash(maskrcnn) -> None:
    results = maskrcnn([Image.new("RGB", (1, 1), (200, 0, 0)), Image.new("RGB", (64, 64))])
    assert len(results) == 2
    for det in results:
        assert det.features.shape[1] == 1024 and len(det) <= 3


def test_mobilenet_behind_the_same_interface(mobilenet) -> None:
    assert mobilenet.feature_dim == 1024
    dets = mobilenet(small_images(("102", "113")))
    assert [d.features.shape for d in dets] == [(3, 1024), (3, 1024)]
    assert all(label in mobilenet.categories for d in dets for label in d.labels)
    assert mobilenet.signature()["model"] == "fasterrcnn_mobilenet_v3_large_fpn"


def test_signature_names_everything_that_changes_features(maskrcnn, mobilenet) -> None:
    sig = maskrcnn.signature()
    assert sig["model"] == "maskrcnn_resnet50_fpn"
    assert sig["weights"].startswith("random:")  # a hash of these random parameters
    assert (sig["min_size"], sig["max_size"], sig["top_k"], sig["score_threshold"]) == (128, 160, 3, 0.0)
    assert sig["proposals"] == 100
    assert signature_key(sig) == maskrcnn.signature_key()
    assert signature_key({**sig, "top_k": 5}) != maskrcnn.signature_key()
    assert maskrcnn.signature_key() != mobilenet.signature_key()


def test_local_weights_file_loads_without_pickle(mobilenet, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in mobilenet.model.state_dict().items()}
    torch.save(state, tmp_path / "w.pth")
    save_file(state, str(tmp_path / "w.safetensors"))
    image = small_images(("102",))
    expected = mobilenet(image)[0]
    for name in ("w.pth", "w.safetensors"):
        loaded = make_fasterrcnn_mobilenet_detector(
            **{**SMALL, "weights": str(tmp_path / name)}
        )
        assert loaded.signature()["weights"].startswith("sha256:")
        got = loaded(image)[0]
        assert got.labels == expected.labels
        numpy.testing.assert_allclose(got.features, expected.features, atol=1e-6)


class NotTensors:
    pass


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    torch.save({"model": NotTensors()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refused.*never unpickled") as info:
        make_fasterrcnn_mobilenet_detector(weights=str(tmp_path / "evil.pth"), device="cpu")
    assert_no_unsafe_advice(str(info.value))


def assert_no_unsafe_advice(message: str) -> None:
    """A refusal never passes on torch's advice to load with weights_only=False."""
    assert "weights_only" not in message and "False" not in message, message


def test_bad_weights_arguments() -> None:
    with pytest.raises(FileNotFoundError):
        make_fasterrcnn_mobilenet_detector(weights="/no/such/weights.pth", device="cpu")
    with pytest.raises(ValueError, match="unknown weights 'IMAGENET'"):
        make_fasterrcnn_mobilenet_detector(weights="IMAGENET", device="cpu")
    with pytest.raises(ValueError, match="top_k"):
        make_fasterrcnn_mobilenet_detector(weights=None, top_k=0, device="cpu")


# -- named (DEFAULT) weights: never unpickled, always hash-checked ----------------

MOBILENET_FILE = "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth"


class Plant:
    """Unpickling this writes ``marker``: what a planted checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache; any download attempt fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints


def plant(path: Path, marker: Path) -> None:
    torch.save({"backbone.body.0.0.weight": Plant(marker)}, path)
    assert not marker.exists()


def sha256_of(path: Path) -> str:
    from spacy_agban.detection.detector import file_sha256

    return file_sha256(path)


def test_planted_default_weights_never_run(hub: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    plant(hub / MOBILENET_FILE, marker)
    with pytest.raises(ValueError, match="refusing detector weights .*fb6a3cc7"):
        make_fasterrcnn_mobilenet_detector(weights="DEFAULT", device="cpu")
    assert not marker.exists()
    torch.load(hub / MOBILENET_FILE, weights_only=False)  # the plant is live: torchvision's load runs it
    assert marker.exists()


def test_planted_file_with_the_right_hash_is_still_not_unpickled(
    hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.models.detection import FasterRCNN_MobileNet_V3_Large_FPN_Weights as Weights

    marker = tmp_path / "marker"
    plant(tmp_path / "evil.pth", marker)
    name = f"mobilenet-{sha256_of(tmp_path / 'evil.pth')[:8]}.pth"  # passes the hash check
    (tmp_path / "evil.pth").rename(hub / name)
    monkeypatch.setattr(Weights.COCO_V1.value, "url", f"https://example.invalid/{name}")
    with pytest.raises(ValueError, match="never unpickled") as info:
        make_fasterrcnn_mobilenet_detector(weights="DEFAULT", device="cpu")
    assert_no_unsafe_advice(str(info.value))
    assert not marker.exists()


def test_wrong_hash_weights_are_refused(hub: Path) -> None:
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    state = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None).state_dict()
    torch.save(state, hub / MOBILENET_FILE)  # real tensors, but not the published file
    with pytest.raises(ValueError, match="does not start with 'fb6a3cc7'"):
        make_fasterrcnn_mobilenet_detector(weights="COCO_V1", device="cpu")


def test_missing_weights_are_downloaded_with_the_hash_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spacy_agban.detection.detector import fetch_torchvision_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    calls = []

    def download(url: str, dst: str, hash_prefix=None, progress=True) -> None:
        calls.append((url, hash_prefix))
        Path(dst).write_bytes(b"tensors")

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    url = "https://download.pytorch.org/models/" + MOBILENET_FILE
    path = fetch_torchvision_weights(url)
    assert path == tmp_path / "torch" / "hub" / "checkpoints" / MOBILENET_FILE and path.is_file()
    assert calls == [(url, "fb6a3cc7")]
    with pytest.raises(FileNotFoundError, match="not in the torch hub cache"):
        fetch_torchvision_weights(url.replace("fb6a3cc7", "0123abcd"), download=False)
    with pytest.raises(ValueError, match="no sha256 prefix"):
        fetch_torchvision_weights("https://example.invalid/weights.pth")


def test_default_weights_build_torchvisions_pretrained_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loaded here, the weights give the very model torchvision's builder gives
    (frozen BatchNorm, Mask R-CNN's eps 0), so stored features stay valid."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights as Weights
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)
    state = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    state = {k: (torch.rand_like(v) * 0.01 if k.endswith("running_var") else v)
             for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "w.pth")
    name = f"maskrcnn-{sha256_of(tmp_path / 'w.pth')[:8]}.pth"
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (tmp_path / "w.pth").rename(checkpoints / name)
    monkeypatch.setattr(Weights.COCO_V1.value, "url", f"https://example.invalid/{name}")
    ours = make_mask_rcnn_detector(weights="DEFAULT", device="cpu", min_size=128, max_size=160).model
    theirs = maskrcnn_resnet50_fpn(weights=Weights.COCO_V1, min_size=128, max_size=160)  # trusted file
    assert [(n, type(m), getattr(m, "eps", None)) for n, m in ours.named_modules()] == [
        (n, type(m), getattr(m, "eps", None)) for n, m in theirs.named_modules()
    ]
    theirs_state = theirs.state_dict()
    assert ours.state_dict().keys() == theirs_state.keys()
    assert all(torch.equal(v, theirs_state[k]) for k, v in ours.state_dict().items())
