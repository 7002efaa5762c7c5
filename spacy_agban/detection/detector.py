"""Object detectors that return the paper's 1024-d object features.

AGBAN (Zheng et al. 2020, Sec. III-B) represents an image by its top-k objects
from Mask R-CNN, each as the output of the "last pooling layer": torchvision's
``roi_heads.box_head`` (TwoMLPHead, 1024-d) applied to the RoIAlign pooling
(``roi_heads.box_roi_pool``) of the FPN features over the object's *final*
box. torchvision computes that head for the 1000 proposals, not for the final
(regressed, NMS-filtered) boxes, so the feature is recomputed here for the
top-k final boxes, in the coordinates of the resized input the FPN saw.

Both detectors run the same steps as ``model(images)`` in eval mode (transform,
backbone, RPN, box branch, postprocessing) but skip the mask branch, which the
features do not need. Images are batched only with images of the same padded
input shape, so an image's result never depends on which batch it fell in: a
cached feature is the feature a fresh run would give.
"""
import contextlib
import hashlib
import json
import os
import pickle
import urllib.error
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

import torch
from PIL import Image
from spacy.util import registry
from torchvision.models import detection as tv_detection
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.transforms.functional import to_tensor

from ..units.base import OBJECT_FEATURE_DIM
from .images import MAX_ASPECT
from .store import Detections

#: Bumped whenever the feature extraction below changes what it returns.
EXTRACTION_VERSION = 1
LOCAL_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


class RandomWeightsWarning(UserWarning):
    """The detector has random weights: its features carry no visual meaning."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(module: torch.nn.Module) -> str:
    """Identity of weights that have no name (random init): hash of every tensor."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_local_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """A state dict from safetensors or a tensors-only torch file (never unpickled)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds more than tensors and is refused: weights are loaded as tensors "
            f"only, never unpickled ({unpickler_reason(err)}). Save the weights with "
            "safetensors, or as a state dict of tensors."
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # torchvision's reference training scripts save {"model": ...}
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def unpickler_reason(err: BaseException) -> str:
    """What torch's weights-only unpickler refused, without torch's advice to retry
    with ``weights_only=False`` (which would run whatever code the file holds)."""
    for line in str(err).splitlines():
        line = line.strip()
        if "weights_only" not in line and any(w in line for w in ("GLOBAL", "Unsupported", "WeightsUnpickler")):
            line = line.replace("WeightsUnpickler error:", "").strip()
            return line.split(". ")[0].rstrip(".")[:200]
    return "not a tensors-only file"


def load_state_into(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: Path, model_name: str) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Built untrained, the model has BatchNorm where the COCO checkpoints have
    # FrozenBatchNorm (no num_batches_tracked); nothing else may differ.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit {model_name}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def weights_cache_path(url: str) -> Path:
    """Where torch.hub keeps the file of a weights URL: <hub dir>/checkpoints/<file name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def name_hash_prefix(file_name: str) -> str:
    """The sha256 prefix torchvision puts in its file names (``...-bf2d0c1e.pth``)."""
    match = torch.hub.HASH_REGEX.search(file_name)
    if match is None or len(match.group(1)) < 8:
        raise ValueError(f"weights file name {file_name!r} carries no sha256 prefix to check it against")
    return match.group(1)


def fetch_torchvision_weights(url: str, download: bool = True) -> Path:
    """The hash-checked local file of a torchvision weights URL, downloaded if missing.

    torchvision's own loader checks the hash only when it downloads, then unpickles
    whatever file sits in the cache: a planted file would run code. Here the cached
    file is checked against the sha256 prefix in its name every time, and it is
    loaded with ``weights_only=True`` after that.
    """
    path = weights_cache_path(url)
    prefix = name_hash_prefix(path.name)
    if not path.is_file():
        if not download:
            raise FileNotFoundError(f"detector weights {path} are not in the torch hub cache")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Checks the prefix before moving the finished download into place.
            torch.hub.download_url_to_file(url, str(path), hash_prefix=prefix)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            # One line that says how to get the weights, not urllib's chain of tracebacks.
            raise WeightsUnavailableError(weights_unavailable_message(url, path, err)) from None
        return path
    digest = file_sha256(path)
    if not digest.startswith(prefix):
        raise ValueError(
            f"refusing detector weights {path}: its sha256 {digest[:16]}... does not start with "
            f"{prefix!r}, the hash in its name (a corrupt or replaced file; delete it to download it again)"
        )
    return path


class WeightsUnavailableError(OSError):
    """Pretrained detector weights are not in the torch hub cache and cannot be downloaded."""


def weights_unavailable_message(url: str, path: Path, err: BaseException) -> str:
    reason = " ".join(str(getattr(err, "reason", err)).split())
    return (
        f"cannot download the detector weights {url} ({reason}), and they are not in the torch hub "
        f"cache. Download that file elsewhere and copy it to {path} (its sha256 is checked against "
        "the hash in its name), or use a local .pth/.safetensors file as the weights (`weights` in "
        "the detector's config block, `--weights` on the command line)."
    )


def freeze_batch_norm(module: torch.nn.Module) -> None:
    """BatchNorm2d → FrozenBatchNorm2d, as torchvision's builders do for pretrained backbones."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child.num_features, eps=child.eps))
        else:
            freeze_batch_norm(child)


def _is_local_path(weights: str) -> bool:
    return weights.endswith(LOCAL_WEIGHT_SUFFIXES) or "/" in weights or "\\" in weights


class RCNNDetector:
    """A torchvision two-stage detector returning top-k objects with box-head features.

    Call it with PIL images; it returns one :class:`Detections` per image, best
    first, boxes in the coordinates of the image given.
    """

    def __init__(
        self,
        model_name: str,
        builder: Callable[..., torch.nn.Module],
        weights_enum: Any,
        weights: Optional[str] = "DEFAULT",
        top_k: int = 3,
        score_threshold: float = 0.05,
        min_size: int = 800,
        max_size: int = 1333,
        device: str = "auto",
        batch_size: int = 4,
        mixed_precision: bool = True,
        proposals: int = 1000,
    ):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not 0 < min_size <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.model_name = model_name
        self.top_k = top_k
        self.score_threshold = float(score_threshold)
        self.min_size = min_size
        self.max_size = max_size
        self.batch_size = max(1, batch_size)
        self.proposals = proposals
        self.device = resolve_device(device)
        self.mixed_precision = mixed_precision and self.device.type == "cuda"
        self.categories: List[str] = list(weights_enum.COCO_V1.meta["categories"])
        self.model, self.weights_id = self._build(builder, weights_enum, weights)
        self.model.roi_heads.score_thresh = self.score_threshold
        # Only the top k are used; keeping more would make model(images) run the
        # mask head on 100 boxes for nothing.
        self.model.roi_heads.detections_per_img = self.top_k
        self.model.to(self.device).eval()
        self.feature_dim = int(self.model.roi_heads.box_head.fc7.out_features)
        if self.feature_dim != OBJECT_FEATURE_DIM:
            raise ValueError(f"{model_name} box head gives {self.feature_dim}-d features, not {OBJECT_FEATURE_DIM}")
        self._signature: Optional[Dict[str, Any]] = None

    def _build(self, builder: Callable[..., torch.nn.Module], weights_enum: Any, weights: Optional[str]) -> Tuple[torch.nn.Module, str]:
        kwargs = dict(
            min_size=self.min_size,
            max_size=self.max_size,
            box_score_thresh=self.score_threshold,
            # RPN proposals kept per image at inference (per FPN level before NMS, in
            # all after): the box head runs on each, which dominates CPU time.
            rpn_pre_nms_top_n_test=self.proposals,
            rpn_post_nms_top_n_test=self.proposals,
        )
        if weights is None:
            warnings.warn(
                f"{self.model_name} built with RANDOM weights (weights=None): its object "
                "features and labels are meaningless. Use this for tests only.",
                RandomWeightsWarning,
                stacklevel=3,
            )
            model = builder(weights=None, weights_backbone=None, num_classes=len(self.categories), **kwargs)
            return model, "random"  # completed with a parameter hash in signature()
        if _is_local_path(weights) or Path(weights).is_file():
            path = Path(weights).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"detector weights file not found: {path}")
            model = builder(weights=None, weights_backbone=None, num_classes=len(self.categories), **kwargs)
            load_state_into(model, load_local_state_dict(path), path, self.model_name)
            return model, f"sha256:{file_sha256(path)}"
        try:
            weights_value = weights_enum.verify(weights)
        except (KeyError, ValueError) as err:
            raise ValueError(
                f"unknown weights {weights!r} for {self.model_name}: use 'DEFAULT', a name of "
                f"{weights_enum.__name__}, or a local .pt/.pth/.safetensors file"
            ) from err
        return self._pretrained(builder, weights_value, kwargs), f"torchvision:{weights_value}"

    def _pretrained(self, builder: Callable[..., torch.nn.Module], weights_value: Any, kwargs: Dict[str, Any]) -> torch.nn.Module:
        """torchvision's pretrained model, with the weights loaded here rather than by
        torchvision (whose loader unpickles the cached file: see fetch_torchvision_weights)."""
        path = fetch_torchvision_weights(weights_value.url)
        model = builder(weights=None, weights_backbone=None, num_classes=len(self.categories), **kwargs)
        # What the builder does when given weights, so the model equals its pretrained one:
        # frozen BatchNorm in the backbone, and eps 0 for the first Mask R-CNN weights.
        freeze_batch_norm(model.backbone.body)
        load_state_into(model, load_local_state_dict(path), path, self.model_name)
        if weights_value == tv_detection.MaskRCNN_ResNet50_FPN_Weights.COCO_V1:
            overwrite_eps(model, 0.0)
        return model

    # -- identity -----------------------------------------------------------------

    def signature(self) -> Dict[str, Any]:
        """Everything that changes the stored result. Device and precision are left out
        on purpose: a store filled on a GPU serves training on a CPU."""
        if self._signature is None:
            weights_id = self.weights_id
            if weights_id == "random":
                weights_id = f"random:{state_dict_sha256(self.model)}"
            self._signature = {
                "model": self.model_name,
                "weights": weights_id,
                "min_size": self.min_size,
                "max_size": self.max_size,
                "top_k": self.top_k,
                "score_threshold": self.score_threshold,
                "nms_threshold": float(self.model.roi_heads.nms_thresh),
                "proposals": self.proposals,
                "feature": "roi_heads.box_head(final boxes)",
                "max_aspect": MAX_ASPECT,
                "extraction_version": EXTRACTION_VERSION,
            }
        return dict(self._signature)

    def signature_key(self) -> str:
        return signature_key(self.signature())

    # -- detection ----------------------------------------------------------------

    def __call__(self, images: Sequence[Image.Image]) -> List[Detections]:
        tensors = [to_tensor(image.convert("RGB")) for image in images]
        return self.detect_tensors(tensors)

    def detect_tensors(self, tensors: Sequence[torch.Tensor]) -> List[Detections]:
        """Detect on (3, H, W) float tensors in [0, 1]; batches same-shape inputs."""
        results: List[Optional[Detections]] = [None] * len(tensors)
        prepared = [self._prepare(tensor) for tensor in tensors]
        by_shape: Dict[Tuple[int, ...], List[int]] = OrderedDict()
        for index, (batch, _, _) in enumerate(prepared):
            by_shape.setdefault(tuple(batch.shape), []).append(index)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch = torch.cat([prepared[i][0] for i in chunk])
                sizes = [prepared[i][1] for i in chunk]
                originals = [prepared[i][2] for i in chunk]
                for i, det in zip(chunk, self._detect_batch(batch, sizes, originals)):
                    results[i] = det
        return [r for r in results if r is not None]

    @torch.inference_mode()
    def _prepare(self, tensor: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int], Tuple[int, int]]:
        """torchvision's own normalize/resize/pad for one image (padded to a multiple of 32)."""
        original = (int(tensor.shape[-2]), int(tensor.shape[-1]))
        image_list, _ = self.model.transform([tensor.to(self.device)])
        return image_list.tensors, tuple(image_list.image_sizes[0]), original  # type: ignore[return-value]

    def _autocast(self) -> Any:
        if self.mixed_precision:  # CUDA only: float16 halves time and memory there
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def _detect_batch(
        self, batch: torch.Tensor, sizes: List[Tuple[int, int]], originals: List[Tuple[int, int]]
    ) -> List[Detections]:
        model = self.model
        heads = model.roi_heads
        with self._autocast():
            features = model.backbone(batch)
            if isinstance(features, torch.Tensor):
                features = OrderedDict([("0", features)])
            proposals, _ = model.rpn(ImageList(batch, sizes), features)
            # The box branch of roi_heads.forward (eval), without the mask branch.
            pooled = heads.box_head(heads.box_roi_pool(features, proposals, sizes))
            class_logits, box_regression = heads.box_predictor(pooled)
            boxes, scores, labels = heads.postprocess_detections(
                class_logits.float(), box_regression.float(), proposals, sizes
            )
            top_boxes = [b[: self.top_k] for b in boxes]  # already sorted by score (batched_nms)
            # The paper's object feature: the box head on the *final* boxes (resized coords).
            top_features = heads.box_head(heads.box_roi_pool(features, top_boxes, sizes)).float()
        results = []
        per_image = top_features.split([len(b) for b in top_boxes])
        for i, feats in enumerate(per_image):
            k = len(top_boxes[i])
            original_boxes = resize_boxes(top_boxes[i].float(), list(sizes[i]), list(originals[i]))
            results.append(
                Detections(
                    features=feats.cpu().numpy(),
                    labels=[self.categories[int(j)] for j in labels[i][:k]],
                    scores=scores[i][:k].float().cpu().numpy(),
                    boxes=original_boxes.cpu().numpy(),
                )
            )
        return results


def signature_key(signature: Dict[str, Any]) -> str:
    """A short stable key for a signature (sha256 of its canonical JSON)."""
    canonical = json.dumps(signature, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


@registry.misc("spacy_agban.MaskRCNNDetector.v1")
def make_mask_rcnn_detector(
    weights: Optional[str] = "DEFAULT",
    top_k: int = 3,
    score_threshold: float = 0.05,
    min_size: int = 800,
    max_size: int = 1333,
    device: str = "auto",
    batch_size: int = 4,
    mixed_precision: bool = True,
    proposals: int = 1000,
) -> RCNNDetector:
    """Mask R-CNN R50-FPN on COCO: the paper's detector."""
    return RCNNDetector(
        "maskrcnn_resnet50_fpn",
        tv_detection.maskrcnn_resnet50_fpn,
        tv_detection.MaskRCNN_ResNet50_FPN_Weights,
        weights=weights,
        top_k=top_k,
        score_threshold=score_threshold,
        min_size=min_size,
        max_size=max_size,
        device=device,
        batch_size=batch_size,
        mixed_precision=mixed_precision,
        proposals=proposals,
    )


@registry.misc("spacy_agban.FasterRCNNMobileNetDetector.v1")
def make_fasterrcnn_mobilenet_detector(
    weights: Optional[str] = "DEFAULT",
    top_k: int = 3,
    score_threshold: float = 0.05,
    min_size: int = 800,
    max_size: int = 1333,
    device: str = "auto",
    batch_size: int = 4,
    mixed_precision: bool = True,
    proposals: int = 1000,
) -> RCNNDetector:
    """Faster R-CNN MobileNetV3-Large FPN on COCO: about 5x faster on a CPU, same
    1024-d box-head features (not the paper's setting)."""
    return RCNNDetector(
        "fasterrcnn_mobilenet_v3_large_fpn",
        tv_detection.fasterrcnn_mobilenet_v3_large_fpn,
        tv_detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights,
        weights=weights,
        top_k=top_k,
        score_threshold=score_threshold,
        min_size=min_size,
        max_size=max_size,
        device=device,
        batch_size=batch_size,
        mixed_precision=mixed_precision,
        proposals=proposals,
    )
