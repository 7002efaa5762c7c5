"""Safe image loading for object detection.

``doc._.image`` may be a path string (what a DocBin stores, i.e. *data*), a
``pathlib.Path`` (a caller's explicit choice at run time) or a ``PIL.Image.Image``.
Loading happens in two steps so that a feature-store hit never decodes anything:

1. :meth:`ImageLoader.read` resolves the reference, applies the path and URL
   rules and reads the raw bytes; the sha256 of the bytes keys the store.
2. :meth:`ImageLoader.decode` checks the pixel count *before* decoding, then
   decodes to an RGB image of bounded size (EXIF rotation applied, alpha
   composited on white, extreme aspect ratios padded).

Every failure is an :class:`ImageLoadError` naming the image and saying why.
"""
import hashlib
import io
import os
import re
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy
from PIL import Image, ImageOps

#: Refuse images above this many pixels (header check, before decoding).
DEFAULT_MAX_PIXELS = 64_000_000
#: Refuse local files larger than this (a photo this large is not a tweet image).
DEFAULT_MAX_BYTES = 100 * 2**20
#: Remote fetches are capped lower, and time out.
DEFAULT_REMOTE_MAX_BYTES = 20 * 2**20
DEFAULT_REMOTE_TIMEOUT = 10.0
#: Pad (never stretch) images whose long side exceeds this multiple of the short
#: side: the detector's resize would otherwise shrink the short side to 0 px.
MAX_ASPECT = 20.0

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")

ImageRef = Union[str, Path, Image.Image]


class ImageLoadError(Exception):
    """An image that cannot be used, with the reason. ``kind`` is one of
    ``missing``, ``refused``, ``corrupt``, ``too_large``, ``remote``."""

    def __init__(self, path: str, reason: str, kind: str = "corrupt"):
        super().__init__(f"cannot use image {path!r}: {reason}")
        self.path = path
        self.reason = reason
        self.kind = kind


class ImageWarning(UserWarning):
    """An image was skipped; the doc falls back to its caption or its text."""


@dataclass
class ImageSource:
    """A resolved image reference: raw bytes (files, URLs) or an in-memory image."""

    name: str
    data: Optional[bytes] = None
    image: Optional[Image.Image] = None

    def content_key(self) -> str:
        """sha256 of the content: the file bytes, or the pixels of an in-memory image."""
        digest = hashlib.sha256()
        if self.data is not None:
            digest.update(self.data)
        else:
            assert self.image is not None
            image = self.image
            digest.update(f"pil:{image.mode}:{image.size}:".encode())
            digest.update(image.tobytes())
        return digest.hexdigest()


@dataclass
class KeyedImage:
    """An image already hashed: its content key (sha256 of the bytes), its reference
    (named in messages, read again if ``source`` is None) and its bytes when at hand.
    What the detection and captioning stages take, so that an image is hashed once."""

    key: str
    ref: Any
    source: Optional[ImageSource] = None


@dataclass
class LoadedImage:
    """A decoded RGB image and the factor it was scaled by (loaded = original * scale)."""

    name: str
    image: Image.Image
    original_size: Tuple[int, int]
    scale: Tuple[float, float]  # (x, y)


def describe(ref: Any) -> str:
    """A short name for an image reference, for messages."""
    if isinstance(ref, Image.Image):
        return f"<PIL image {ref.mode} {ref.size[0]}x{ref.size[1]}>"
    return str(ref)


def is_url(ref: str) -> bool:
    return bool(_URL.match(ref))


def _default_opener(url: str, timeout: float) -> Any:
    return urllib.request.urlopen(url, timeout=timeout)


class ImageLoader:
    """Resolve, read and decode images under explicit limits.

    image_root: relative paths resolve against it; a path *string* (data) must
        lie inside it after resolving symlinks and ``..``. ``Path`` objects are a
        caller's explicit choice and may point anywhere.
    allow_remote: fetch ``http(s)://`` URLs (never any other scheme); off by default
        so that data can never make the pipeline reach the network.
    max_pixels: refuse larger images before decoding them.
    max_side: downscale so the long side is at most this (the detector's
        ``max_size``: its own resize would shrink the image at least as much).
    """

    #: Patched in tests; ``(url, timeout) -> response`` with ``read(n)`` and ``headers``.
    opener: Callable[[str, float], Any] = staticmethod(_default_opener)

    def __init__(
        self,
        image_root: Optional[Union[str, Path]] = None,
        allow_remote: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_side: Optional[int] = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        remote_max_bytes: int = DEFAULT_REMOTE_MAX_BYTES,
        remote_timeout: float = DEFAULT_REMOTE_TIMEOUT,
    ):
        self.image_root = Path(image_root).resolve() if image_root is not None else None
        self.allow_remote = allow_remote
        self.max_pixels = int(max_pixels)
        self.max_side = max_side
        self.max_bytes = max_bytes
        self.remote_max_bytes = remote_max_bytes
        self.remote_timeout = remote_timeout

    # -- step 1: resolve and read -------------------------------------------------

    def resolve(self, ref: Union[str, Path]) -> Path:
        """The file a path reference points to, with the ``image_root`` rules applied."""
        name = str(ref)
        if "\x00" in name:  # the OS cannot take it; os calls would raise ValueError
            raise ImageLoadError(name, "the path holds a NUL byte", "refused")
        path = Path(os.path.expanduser(name)) if isinstance(ref, Path) else Path(name)
        if self.image_root is not None and not path.is_absolute():
            path = self.image_root / path
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError, ValueError) as err:  # RuntimeError: a symlink loop
            raise ImageLoadError(name, f"cannot resolve the path: {err}", "refused") from None
        if isinstance(ref, str) and self.image_root is not None:
            if not resolved.is_relative_to(self.image_root):
                raise ImageLoadError(
                    name, f"path lies outside image_root {str(self.image_root)!r}", "refused"
                )
        return resolved

    def read(self, ref: ImageRef) -> ImageSource:
        """Resolve a reference and read its bytes (no decoding)."""
        if isinstance(ref, Image.Image):
            # Refused by its size before its pixels are hashed (a full copy) or decoded.
            self._check_pixels(describe(ref), ref.size)
            return ImageSource(name=describe(ref), image=ref)
        if isinstance(ref, str) and is_url(ref):
            return ImageSource(name=ref, data=self._fetch(ref))
        if not isinstance(ref, (str, Path)):
            raise ImageLoadError(
                describe(ref),
                f"doc._.image must be a path string, a Path or a PIL image, not {type(ref).__name__}",
                "refused",
            )
        if isinstance(ref, str) and not ref.strip():
            raise ImageLoadError(ref, "empty path", "missing")
        return ImageSource(name=str(ref), data=self._read_file(ref))

    def _read_file(self, ref: Union[str, Path]) -> bytes:
        name = str(ref)
        path = self.resolve(ref)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ImageLoadError(name, f"file not found ({path})", "missing") from None
        except OSError as err:
            raise ImageLoadError(name, f"cannot read file: {err}", "missing") from None
        if not path.is_file():
            raise ImageLoadError(name, "not a regular file", "refused")
        if size == 0:
            raise ImageLoadError(name, "empty (zero-byte) file", "corrupt")
        if size > self.max_bytes:
            raise ImageLoadError(
                name, f"file has {size} bytes, over the limit of {self.max_bytes}", "too_large"
            )
        try:
            return path.read_bytes()
        except OSError as err:
            raise ImageLoadError(name, f"cannot read file: {err}", "missing") from None

    def _fetch(self, url: str) -> bytes:
        if not self.allow_remote:
            raise ImageLoadError(
                url, "remote image refused (set allow_remote=True to fetch URLs)", "remote"
            )
        scheme = url.split(":", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise ImageLoadError(url, f"URL scheme {scheme!r} is not fetched", "remote")
        cap = self.remote_max_bytes
        try:
            with self.opener(url, self.remote_timeout) as response:
                declared = response.headers.get("Content-Length")
                if declared is not None and int(declared) > cap:
                    raise ImageLoadError(url, f"remote file declares {declared} bytes, over {cap}", "too_large")
                data = response.read(cap + 1)
        except ImageLoadError:
            raise
        except Exception as err:  # urllib raises many types (URLError, timeout, ValueError)
            raise ImageLoadError(url, f"fetch failed: {err}", "remote") from None
        if len(data) > cap:
            raise ImageLoadError(url, f"remote file exceeds {cap} bytes", "too_large")
        if not data:
            raise ImageLoadError(url, "remote file is empty", "corrupt")
        return data

    # -- step 2: decode -----------------------------------------------------------

    def decode(self, source: ImageSource) -> LoadedImage:
        """Decode to a bounded RGB image, or raise :class:`ImageLoadError`."""
        if source.image is not None:
            image = source.image
            self._check_pixels(source.name, image.size)
            try:
                image.load()
            except Exception as err:
                raise ImageLoadError(source.name, f"cannot decode: {err}", "corrupt") from None
            header_size = image.size
        else:
            image, header_size = self._open(source)
        try:
            orientation = image.getexif().get(0x0112, 1)
            image = ImageOps.exif_transpose(image)
        except Exception:  # a broken EXIF block should not cost the image
            orientation = 1
        # The header size, rotated like the pixels: boxes are reported in it.
        if orientation in (5, 6, 7, 8):
            header_size = (header_size[1], header_size[0])
        image = self._bound_size(source.name, image, header_size)
        scale = (image.size[0] / header_size[0], image.size[1] / header_size[1])
        image = pad_aspect(to_rgb(image))
        return LoadedImage(source.name, image, header_size, scale)

    def load(self, ref: ImageRef) -> LoadedImage:
        return self.decode(self.read(ref))

    def _check_pixels(self, name: str, size: Tuple[int, int]) -> None:
        width, height = size
        if width < 1 or height < 1:
            raise ImageLoadError(name, f"degenerate size {width}x{height}", "corrupt")
        if width * height > self.max_pixels:
            raise ImageLoadError(
                name,
                f"{width}x{height} = {width * height} pixels, over the limit of "
                f"{self.max_pixels} (possible decompression bomb)",
                "too_large",
            )

    def _open(self, source: ImageSource) -> Tuple[Image.Image, Tuple[int, int]]:
        assert source.data is not None
        # Our own pixel limit is checked below on the header; PIL's global bomb
        # warning is silenced here, and its hard error mapped to ours.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(source.data))
            except Image.DecompressionBombError as err:
                raise ImageLoadError(source.name, f"refused by PIL: {err}", "too_large") from None
            except Exception as err:
                raise ImageLoadError(source.name, f"not a readable image: {err}", "corrupt") from None
            header_size = image.size
            self._check_pixels(source.name, header_size)
            target = self._target_size(header_size)
            if target is not None and image.format == "JPEG":
                image.draft("RGB", target)  # decode at 1/2..1/8 scale: less time and memory
            try:
                image.load()
            except Exception as err:  # truncated data raises OSError on load()
                raise ImageLoadError(source.name, f"cannot decode: {err}", "corrupt") from None
        return image, header_size

    def _target_size(self, size: Tuple[int, int]) -> Optional[Tuple[int, int]]:
        width, height = size
        if self.max_side is None or max(width, height) <= self.max_side:
            return None
        ratio = self.max_side / max(width, height)
        return max(1, round(width * ratio)), max(1, round(height * ratio))

    def _bound_size(
        self, name: str, image: Image.Image, original_size: Tuple[int, int]
    ) -> Image.Image:
        """Downscale so the long side is at most ``max_side`` (JPEG draft may already
        have reduced it by a power of two)."""
        target = self._target_size(original_size) or original_size
        if image.size == target:
            return image
        try:
            return image.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)
        except Exception as err:
            raise ImageLoadError(name, f"cannot resize: {err}", "corrupt") from None


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grayscale → 8-bit, stretched to the value range."""
    array = numpy.asarray(image, dtype="float64")
    low, high = float(array.min()), float(array.max())
    scaled = (array - low) * (255.0 / (high - low)) if high > low else numpy.zeros_like(array)
    return Image.fromarray(scaled.astype("uint8"))  # 2-D uint8 → mode "L"


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode → RGB; transparency is composited on white (not on black, which
    ``convert("RGB")`` would leave under transparent pixels)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        image = _high_depth_to_8bit(image)
    has_alpha = image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def pad_aspect(image: Image.Image, max_aspect: float = MAX_ASPECT) -> Image.Image:
    """Pad right/bottom (so box coordinates are unchanged) to at most ``max_aspect``:1."""
    width, height = image.size
    new_width = max(width, int(numpy.ceil(height / max_aspect)))
    new_height = max(height, int(numpy.ceil(width / max_aspect)))
    if (new_width, new_height) == (width, height):
        return image
    padded = Image.new("RGB", (new_width, new_height), (0, 0, 0))
    padded.paste(image, (0, 0))
    return padded


def content_key(loader: "ImageLoader", ref: Any, memo: Dict[Any, str]) -> Tuple[str, Optional[ImageSource]]:
    """sha256 of an image reference's content, and its bytes when they were read.

    A file is hashed once per (path, mtime, size) and a URL fetched once per process
    (``memo`` keeps the keys: clear it when the image root changes); a known file then
    comes back without its bytes (None), to be read again only if it must be decoded.
    """
    memo_key: Any = None
    if isinstance(ref, (str, Path)) and not (isinstance(ref, str) and is_url(ref)):
        if isinstance(ref, str) and not ref.strip():
            raise ImageLoadError(ref, "empty path", "missing")
        try:
            path = loader.resolve(ref)
            stat = path.stat()
            memo_key = (str(path), stat.st_mtime_ns, stat.st_size)
        except OSError:
            memo_key = None  # read() gives the precise error
    elif isinstance(ref, str):  # a URL
        memo_key = ref
    if memo_key is not None and memo_key in memo:
        return memo[memo_key], None
    source = loader.read(ref)
    key = source.content_key()
    if memo_key is not None:
        memo[memo_key] = key
    return key, source


def first_per_key(images: Sequence[KeyedImage]) -> Dict[str, KeyedImage]:
    """One image per distinct content key, in order; one whose bytes are at hand is
    preferred, so that a miss is not read twice."""
    first: Dict[str, KeyedImage] = {}
    for image in images:
        if image.key not in first or (first[image.key].source is None and image.source is not None):
            first[image.key] = image
    return first


def key_images(
    refs: Sequence[Any], key_of: Callable[[Any], Tuple[str, Optional[ImageSource]]]
) -> Tuple[Dict[int, KeyedImage], Dict[int, ImageLoadError]]:
    """The references of a batch hashed by ``key_of`` (e.g. :func:`content_key` bound to a
    loader), by position: those keyed, and those that could not be read. None (no
    image) is in neither."""
    keyed: Dict[int, KeyedImage] = {}
    failed: Dict[int, ImageLoadError] = {}
    for i, ref in enumerate(refs):
        if ref is None:
            continue
        try:
            key, source = key_of(ref)
        except ImageLoadError as err:
            failed[i] = err
            continue
        keyed[i] = KeyedImage(key, ref, source)
    return keyed, failed
