"""Safe image loading: every bad input gives a clear ImageLoadError naming the image."""
import io
from pathlib import Path

import numpy
import pytest
from PIL import Image

from spacy_agban.detection.images import ImageLoader, ImageLoadError, ImageSource, is_url


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    return folder


def gradient(width: int, height: int) -> Image.Image:
    x = numpy.linspace(0, 255, width, dtype="uint8")[None, :, None]
    y = numpy.linspace(0, 255, height, dtype="uint8")[:, None, None]
    array = numpy.concatenate(
        [numpy.broadcast_to(x, (height, width, 1)), numpy.broadcast_to(y, (height, width, 1)),
         numpy.full((height, width, 1), 128, "uint8")], axis=2)
    return Image.fromarray(numpy.ascontiguousarray(array))


def hgradient(width: int, height: int) -> Image.Image:
    """Gray ramp from black (left) to white (right), in every channel."""
    row = numpy.linspace(0, 255, width).astype("uint8")
    return Image.fromarray(numpy.ascontiguousarray(numpy.broadcast_to(row[None, :, None], (height, width, 3))))


def test_plain_jpeg_loads_as_rgb(root: Path) -> None:
    save(gradient(64, 48), root / "a.jpg")
    loaded = ImageLoader(image_root=root).load("a.jpg")
    assert loaded.image.mode == "RGB"
    assert loaded.image.size == (64, 48) == loaded.original_size
    assert loaded.scale == (1.0, 1.0)


def test_missing_file_names_the_image(root: Path) -> None:
    with pytest.raises(ImageLoadError) as info:
        ImageLoader(image_root=root).load("nope.jpg")
    assert info.value.kind == "missing"
    assert "nope.jpg" in str(info.value) and "not found" in str(info.value)


def test_zero_byte_file(root: Path) -> None:
    (root / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.jpg.*zero-byte"):
        ImageLoader(image_root=root).load("empty.jpg")


def test_not_an_image(root: Path) -> None:
    (root / "text.jpg").write_bytes(b"hello, I am not a JPEG")
    with pytest.raises(ImageLoadError, match="text.jpg.*not a readable image"):
        ImageLoader(image_root=root).load("text.jpg")


def test_truncated_jpeg(root: Path) -> None:
    buffer = io.BytesIO()
    gradient(200, 150).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as info:
        ImageLoader(image_root=root).load("cut.jpg")
    assert info.value.kind == "corrupt" and "cut.jpg" in str(info.value)


def test_png_alpha_is_composited_on_white(root: Path) -> None:
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 255))
    image.paste((0, 0, 0, 0), (0, 0, 5, 10))  # left half fully transparent black
    save(image, root / "alpha.png")
    loaded = ImageLoader(image_root=root).load("alpha.png").image
    assert loaded.mode == "RGB"
    assert loaded.getpixel((1, 1)) == (255, 255, 255)  # not black
    assert loaded.getpixel((8, 8)) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["P", "L", "LA", "CMYK", "1", "I;16", "I", "F"])
def test_other_modes_become_rgb(root: Path, mode: str) -> None:
    base = hgradient(20, 12)
    if mode == "P":
        image = base.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode in ("I;16", "I", "F"):
        array = numpy.asarray(base.convert("L"), dtype="uint16") * 200
        image = Image.fromarray(array.astype("uint16")).convert(mode) if mode != "I;16" else Image.fromarray(array)
    else:
        image = base.convert(mode)
    suffix = {"CMYK": "jpg", "F": "tiff", "I": "tiff"}.get(mode, "png")
    save(image, root / f"m.{suffix}")
    loaded = ImageLoader(image_root=root).load(f"m.{suffix}").image
    assert loaded.mode == "RGB" and loaded.size == (20, 12)
    if mode in ("I;16", "I", "F", "L"):  # the gradient survives (not clipped to white)
        row = numpy.asarray(loaded)[6, :, 0].astype(int)
        assert row[-1] - row[0] > 100


def test_palette_with_transparency(root: Path) -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.paste(1, (2, 0, 4, 4))
    image.info["transparency"] = 0
    save(image, root / "pt.png", transparency=0)
    loaded = ImageLoader(image_root=root).load("pt.png").image
    assert loaded.getpixel((0, 0)) == (255, 255, 255) and loaded.getpixel((3, 3)) == (0, 255, 0)


def test_exif_rotation_is_applied(root: Path) -> None:
    image = gradient(40, 20)  # landscape pixels, EXIF says "rotate 90° CW to display"
    exif = Image.Exif()
    exif[0x0112] = 6
    save(image, root / "rot.jpg", exif=exif.tobytes())
    loaded = ImageLoader(image_root=root).load("rot.jpg")
    assert loaded.image.size == (20, 40)
    assert loaded.original_size == (20, 40)


def test_one_pixel_image(root: Path) -> None:
    save(Image.new("RGB", (1, 1), (10, 20, 30)), root / "dot.png")
    loaded = ImageLoader(image_root=root, max_side=160).load("dot.png")
    assert loaded.image.size == (1, 1) and loaded.image.getpixel((0, 0)) == (10, 20, 30)


def test_extreme_aspect_ratio_is_padded_not_stretched(root: Path) -> None:
    save(gradient(1000, 2), root / "strip.png")
    loaded = ImageLoader(image_root=root).load("strip.png")
    assert loaded.image.size == (1000, 50)
    assert loaded.scale == (1.0, 1.0)  # padding keeps the coordinates


def test_large_image_is_downscaled_to_max_side(root: Path) -> None:
    save(gradient(3000, 2000), root / "big.jpg", quality=70)
    loaded = ImageLoader(image_root=root, max_side=500).load("big.jpg")
    assert max(loaded.image.size) == 500 and loaded.image.size == (500, 333)
    assert loaded.original_size == (3000, 2000)
    assert loaded.scale == pytest.approx((500 / 3000, 333 / 2000))


def test_decompression_bomb_refused_before_decoding(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save(Image.new("L", (4000, 3000)), root / "bomb.png")  # tiny file, 12 Mpx
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1) or None)
    with pytest.raises(ImageLoadError) as info:
        ImageLoader(image_root=root, max_pixels=1_000_000).load("bomb.png")
    assert info.value.kind == "too_large" and "bomb.png" in str(info.value)
    assert "decompression bomb" in str(info.value)
    assert not decoded  # refused from the header


def test_pil_global_bomb_error_becomes_ours(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save(Image.new("L", (300, 300)), root / "b.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL raises above 2x this
    with pytest.raises(ImageLoadError, match="b.png"):
        ImageLoader(image_root=root, max_pixels=10**9).load("b.png")


@pytest.mark.parametrize("ref", ["../secret.jpg", "sub/../../secret.jpg"])
def test_dotdot_escape_from_image_root_is_refused(root: Path, ref: str) -> None:
    save(gradient(8, 8), root.parent / "secret.jpg")
    with pytest.raises(ImageLoadError) as info:
        ImageLoader(image_root=root).load(ref)
    assert info.value.kind == "refused" and "outside image_root" in str(info.value)


def test_absolute_data_path_outside_root_refused(root: Path) -> None:
    outside = save(gradient(8, 8), root.parent / "other.jpg")
    with pytest.raises(ImageLoadError, match="outside image_root"):
        ImageLoader(image_root=root).load(str(outside))


def test_symlink_escape_refused(root: Path) -> None:
    outside = save(gradient(8, 8), root.parent / "target.jpg")
    (root / "link.jpg").symlink_to(outside)
    with pytest.raises(ImageLoadError, match="outside image_root"):
        ImageLoader(image_root=root).load("link.jpg")


def test_path_object_is_the_callers_choice(root: Path) -> None:
    outside = save(gradient(8, 8), root.parent / "mine.jpg")
    assert ImageLoader(image_root=root).load(outside).image.size == (8, 8)


def test_pil_image_input_is_not_modified() -> None:
    image = Image.new("RGBA", (5, 5), (0, 0, 255, 128))
    loaded = ImageLoader().load(image)
    assert loaded.image.mode == "RGB" and image.mode == "RGBA"


def test_in_memory_image_over_max_pixels_is_refused_before_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    image = Image.new("RGB", (300, 200))
    touched = []
    monkeypatch.setattr(Image.Image, "tobytes", lambda self, *a: touched.append("tobytes") or b"")
    monkeypatch.setattr(Image.Image, "load", lambda self: touched.append("load"))
    with pytest.raises(ImageLoadError) as info:
        ImageLoader(max_pixels=50_000).read(image)
    assert info.value.kind == "too_large" and "300x200 = 60000 pixels" in str(info.value)
    assert touched == []  # neither hashed nor decoded


def test_wrong_type_is_refused() -> None:
    with pytest.raises(ImageLoadError, match="path string, a Path or a PIL image"):
        ImageLoader().load(12345)  # type: ignore[arg-type]


@pytest.mark.parametrize("url", ["http://example.com/a.jpg", "https://example.com/a.jpg", "ftp://x/a.jpg", "file:///etc/passwd"])
def test_urls_refused_by_default(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("network used")

    monkeypatch.setattr(ImageLoader, "opener", staticmethod(no_network))
    assert is_url(url)
    with pytest.raises(ImageLoadError) as info:
        ImageLoader().load(url)
    assert info.value.kind == "remote" and "allow_remote" in str(info.value)


class FakeResponse:
    def __init__(self, data: bytes, length: bool = True):
        self.data = data
        self.headers = {"Content-Length": str(len(data))} if length else {}

    def read(self, n: int) -> bytes:
        return self.data[:n]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def jpeg_bytes(size=(30, 20)) -> bytes:
    buffer = io.BytesIO()
    gradient(*size).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_allowed_remote_fetch_uses_timeout_and_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def opener(url: str, timeout: float) -> FakeResponse:
        calls.append((url, timeout))
        return FakeResponse(jpeg_bytes())

    monkeypatch.setattr(ImageLoader, "opener", staticmethod(opener))
    loader = ImageLoader(allow_remote=True, remote_timeout=3.0)
    assert loader.load("https://example.com/a.jpg").image.size == (30, 20)
    assert calls == [("https://example.com/a.jpg", 3.0)]
    with pytest.raises(ImageLoadError, match="scheme 'file'"):
        loader.load("file:///etc/passwd")  # allow_remote is about http(s) only


@pytest.mark.parametrize("declare_length", [True, False])
def test_remote_size_cap(monkeypatch: pytest.MonkeyPatch, declare_length: bool) -> None:
    monkeypatch.setattr(ImageLoader, "opener", staticmethod(lambda url, timeout: FakeResponse(b"x" * 5000, declare_length)))
    with pytest.raises(ImageLoadError) as info:
        ImageLoader(allow_remote=True, remote_max_bytes=1000).load("http://example.com/big.jpg")
    assert info.value.kind == "too_large" and "big.jpg" in str(info.value)


def test_remote_errors_are_load_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def opener(url: str, timeout: float):
        raise TimeoutError("timed out")

    monkeypatch.setattr(ImageLoader, "opener", staticmethod(opener))
    with pytest.raises(ImageLoadError, match="slow.jpg.*timed out"):
        ImageLoader(allow_remote=True).load("http://example.com/slow.jpg")


def test_content_key_depends_on_bytes_only(root: Path) -> None:
    data = jpeg_bytes()
    (root / "a.jpg").write_bytes(data)
    (root / "b.jpg").write_bytes(data)
    loader = ImageLoader(image_root=root)
    assert loader.read("a.jpg").content_key() == loader.read("b.jpg").content_key()
    assert ImageSource("x", image=gradient(4, 4)).content_key() != ImageSource("y", image=gradient(4, 5)).content_key()
