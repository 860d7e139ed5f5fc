import numpy as np
import pytest
from badinputs import jpeg, png

from cvpipe.data import images


def rgb(data: bytes) -> np.ndarray:
    im = images.decode(data)
    assert im.mode == "RGB"
    return np.asarray(im)


def test_16bit_png_is_scaled_not_clamped_to_white():
    data = png("I;16")
    a = rgb(data)
    assert a.min() < 20 and a.max() > 235  # full range kept
    assert 100 < a.mean() < 155  # uniform noise stays mid-grey, not white
    assert (a[..., 0] == a[..., 1]).all()


def test_cmyk_jpeg_becomes_rgb():
    a = rgb(jpeg("CMYK", color=(0, 255, 255, 0)))  # pure cyan ink off -> red
    assert a[..., 0].mean() > 200 and a[..., 1].mean() < 50 and a[..., 2].mean() < 50


def test_palette_png_with_transparency_composites_on_white():
    a = rgb(png("P"))  # every pixel is palette index 1 (red), index 0 is transparent
    assert (a == [255, 0, 0]).all()


def test_alpha_and_grayscale_become_rgb():
    assert rgb(png("RGBA")).shape[-1] == 3
    assert rgb(png("LA")).shape[-1] == 3
    a = rgb(png("L"))
    assert (a[..., 0] == a[..., 2]).all()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_image"),
        (b"this is text, not an image", "not_an_image"),
        (jpeg()[:-40], "truncated_image"),
    ],
)
def test_bad_bytes_are_rejected_with_a_reason(data, reason):
    with pytest.raises(images.RejectedImage) as e:
        images.decode(data)
    assert e.value.reason == reason
    with pytest.raises(images.RejectedImage) as e2:
        images.inspect(data)
    assert e2.value.reason == reason


def test_pixel_cap_is_an_error_before_decoding():
    data = png("L", size=(300, 300))
    with pytest.raises(images.RejectedImage) as e:
        images.decode(data, max_pixels=300 * 300 - 1)
    assert e.value.reason == "too_many_pixels" and "90000" in e.value.detail
    assert images.decode(data, max_pixels=300 * 300).size == (300, 300)


def test_pillow_bomb_warning_is_an_error():
    data = png("1", size=(10_000, 9_000))  # 90M pixels: Pillow would only warn
    with pytest.raises(images.RejectedImage) as e:
        images.decode(data, max_pixels=10**12)
    assert e.value.reason == "too_many_pixels"


@pytest.mark.parametrize(
    ("fmt", "mode", "options"),
    [
        ("PNG", "RGB", {}),
        ("PNG", "L", {}),
        ("PNG", "RGBA", {}),
        ("JPEG", "RGB", {}),
        ("JPEG", "L", {}),
        ("JPEG", "RGB", {"progressive": True}),
        ("JPEG", "CMYK", {}),
        ("WEBP", "RGB", {"lossless": True}),
        ("WEBP", "RGBA", {}),
        ("WEBP", "RGB", {"quality": 70}),
        ("GIF", "P", {}),
    ],
)
def test_header_sniffing_agrees_with_pillow(fmt, mode, options):
    import io

    from PIL import Image

    im = Image.new(mode, (53, 37))
    buf = io.BytesIO()
    im.save(buf, format=fmt, **options)
    header = images.inspect(buf.getvalue())
    assert (header.format, header.width, header.height) == (fmt, 53, 37)
