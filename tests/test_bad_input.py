"""Every kind of bad input, one at a time: converted correctly, or skipped and counted."""

from __future__ import annotations

import io
import json
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from mmdiff.data.shards import BadSampleStats, decode_sample

KEY, SHARD = "k0001", "/data/shard-00003.tar"


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def raw(image: bytes | None = None, ext: str = "png", txt: bytes | None = b"a caption",
        meta: dict | bytes | None = None) -> dict:
    sample = {"__key__": KEY, "__url__": SHARD}
    if image is not None:
        sample[ext] = image
    if txt is not None:
        sample["txt"] = txt
    if meta is not None:
        sample["json"] = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    return sample


def decode_ok(sample: dict, **kw):
    stats = BadSampleStats()
    out = decode_sample(sample, stats, **kw)
    assert out is not None, stats.examples
    assert stats.good == 1 and stats.bad == 0
    return out


def decode_bad(sample: dict, **kw) -> str:
    """Decode an expected-bad sample; check it was counted with key and shard; -> reason."""
    stats = BadSampleStats()
    assert decode_sample(sample, stats, **kw) is None
    assert stats.good == 0 and stats.bad == 1
    [(key, shard, reason)] = stats.examples
    assert (key, shard) == (KEY, SHARD)
    assert stats.reasons == {reason.split(":")[0]: 1}
    return reason


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header(width: int, height: int) -> bytes:
    """A PNG claiming ``width x height`` with almost no pixel data: cheap to build, and any
    attempt to decode it fully would fail, so a size refusal must come from the header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 16)) + png_chunk(b"IEND", b""))


# --------------------------------------------------------------------------- text and JSON


@pytest.mark.parametrize("meta, reason", [
    (b"{not json", "json_invalid: "),
    (b"\xff\xfe{}", "json_invalid: "),
    (b"[1, 2]", "json_shape: json must be a mapping, got list"),
    (b'"a caption"', "json_shape: json must be a mapping, got str"),
    ({"qa": "what?"}, "json_shape: qa must be a list, got str"),
    ({"qa": ["what?"]}, "json_shape: qa[0] must be a mapping, got str"),
    ({"qa": [{"question": "what?"}]}, "json_shape: qa[0].answer must be a non-empty str"),
    ({"qa": [{"question": 3, "answer": "a"}]}, "json_shape: qa[0].question must be a str, got int"),
    ({"qa": [{"question": "q", "answer": "a", "answers": "a"}]},
     "json_shape: qa[0].answers must be a list of str, got str"),
    ({"conversations": {"from": "human", "value": "hi"}}, "json_shape: conversations must be a list"),
    ({"conversations": [["human", "hi"]]}, "json_shape: conversations[0] must be a mapping"),
    ({"conversations": [{"from": "bot", "value": "hi"}]},
     "json_shape: conversations[0].from must be 'human' or 'gpt', got 'bot'"),
    ({"conversations": [{"from": "human", "value": None}]},
     "json_shape: conversations[0].value must be a str, got null"),
    ({"caption": 5}, "json_shape: caption must be a str, got int"),
    ({"captions": "one caption"}, "json_shape: captions must be a list of str, got str"),
    ({"captions": ["one", 2]}, "json_shape: captions[1] must be a str, got int"),
    ({"description": ["long"]}, "json_shape: description must be a str, got list"),
    ({"text": {"t": 1}}, "json_shape: text must be a str, got dict"),
])
def test_bad_json_is_skipped_with_reason(meta, reason):
    got = decode_bad(raw(encode(Image.new("RGB", (4, 4))), meta=meta))
    assert got.startswith(reason), got


@pytest.mark.parametrize("txt, meta", [
    (None, None),  # image only
    (None, {"split": "train", "objects": []}),  # metadata but no text field
    (b"  \n", {"caption": ""}),  # empty strings are not text
    (None, {"caption": None, "url": "http://x/y.jpg", "status": "success"}),  # img2dataset, no caption
    (None, {"qa": [], "conversations": [], "captions": []}),
])
def test_missing_text_is_skipped(txt, meta):
    assert decode_bad(raw(encode(Image.new("RGB", (4, 4))), txt=txt, meta=meta)) == "missing_text"


def test_invalid_utf8_txt_is_skipped():
    assert decode_bad(raw(encode(Image.new("RGB", (4, 4))), txt=b"caf\xe9")).startswith("txt_invalid: ")


def test_json_without_txt_and_txt_without_json_are_fine():
    assert decode_ok(raw(None, txt=None, meta={"description": "a long one"})).description == "a long one"
    s = decode_ok(raw(encode(Image.new("RGB", (4, 4))), txt=b"only txt"))
    assert s.caption == "only txt" and s.meta == {}


# --------------------------------------------------------------------------- undecodable images


def test_empty_image_bytes_are_skipped():
    assert decode_bad(raw(b"")) == "image_empty"


def test_garbage_image_bytes_are_skipped():
    assert decode_bad(raw(b"\x00garbage" * 50)) == "image_decode: cannot identify image file"


@pytest.mark.parametrize("fmt, ext", [("JPEG", "jpg"), ("PNG", "png")])
def test_truncated_image_is_skipped(fmt, ext):
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), fmt)
    reason = decode_bad(raw(data[: len(data) // 2], ext=ext))
    assert reason.startswith("image_decode: ") and "truncated" in reason.lower(), reason


def test_image_is_not_required_but_can_be():
    assert decode_ok(raw(None)).image is None
    assert decode_bad(raw(None), require_image=True) == "missing_image"


# --------------------------------------------------------------------------- colour modes -> RGB


def pixels(sample) -> list[tuple[int, int, int]]:
    assert sample.image.mode == "RGB"
    return list(sample.image.getdata())


def test_grayscale_becomes_gray_rgb():
    im = Image.new("L", (2, 1))
    im.putdata([0, 77])
    assert pixels(decode_ok(raw(encode(im)))) == [(0, 0, 0), (77, 77, 77)]


def test_one_bit_becomes_black_and_white():
    im = Image.new("1", (2, 1))
    im.putdata([0, 1])
    assert pixels(decode_ok(raw(encode(im)))) == [(0, 0, 0), (255, 255, 255)]


def test_rgba_is_composited_on_black():
    im = Image.new("RGBA", (3, 1))
    im.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (0, 200, 0, 128)])
    got = pixels(decode_ok(raw(encode(im))))
    assert got[0] == (0, 0, 0)  # fully transparent -> the black background
    assert got[1] == (255, 0, 0)
    assert got[2][0] == 0 and got[2][2] == 0 and abs(got[2][1] - 100) <= 1  # 200 * 128/255


def test_gray_alpha_is_composited_on_black():
    im = Image.new("LA", (2, 1))
    im.putdata([(200, 0), (200, 255)])
    assert pixels(decode_ok(raw(encode(im)))) == [(0, 0, 0), (200, 200, 200)]


def test_palette_with_and_without_transparency():
    im = Image.new("P", (3, 1))
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (253 * 3))
    im.putdata([1, 2, 0])
    assert pixels(decode_ok(raw(encode(im)))) == [(255, 0, 0), (0, 0, 255), (0, 0, 0)]
    # index 2 (blue) transparent -> black background
    got = pixels(decode_ok(raw(encode(im, transparency=2))))
    assert got == [(255, 0, 0), (0, 0, 0), (0, 0, 0)]
    gif = pixels(decode_ok(raw(encode(im, "GIF", transparency=1), ext="gif")))
    assert gif == [(0, 0, 0), (0, 0, 255), (0, 0, 0)]


def test_cmyk_is_converted_with_the_multiplicative_formula():
    im = Image.new("CMYK", (3, 1))
    im.putdata([(0, 255, 255, 0), (255, 0, 0, 0), (128, 0, 0, 128)])
    # exact, lossless TIFF: rgb = (255 - c) * (255 - k) / 255
    got = pixels(decode_ok(raw(encode(im, "TIFF"), ext="tif")))
    assert got == [(255, 0, 0), (0, 255, 255), (63, 127, 127)]
    # CMYK JPEG (Adobe, stored inverted) gives the same colours up to JPEG loss
    big = im.resize((24, 8), Image.NEAREST)
    got = decode_ok(raw(encode(big, "JPEG", quality=100), ext="jpg")).image
    assert got.size == (24, 8)
    for x, want in [(3, (255, 0, 0)), (11, (0, 255, 255)), (20, (63, 127, 127))]:
        assert all(abs(a - b) <= 8 for a, b in zip(got.getpixel((x, 4)), want))


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)  # 32896 = 128 * 257
    im = Image.fromarray(values)
    data = encode(im)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    got = pixels(decode_ok(raw(data)))
    assert [p[0] for p in got] == [0, 4, 128, 255]  # v * 255 / 65535, rounded
    assert all(p[0] == p[1] == p[2] for p in got)


def test_32bit_integer_image_is_scaled_or_stretched():
    in_range = Image.fromarray(np.array([[0, 65535, 257]], dtype=np.int32))
    assert in_range.mode == "I"
    got = pixels(decode_ok(raw(encode(in_range, "TIFF"), ext="tif")))
    assert [p[0] for p in got] == [0, 255, 1]
    wide = Image.fromarray(np.array([[-100, 100000, 49950]], dtype=np.int32))
    got = pixels(decode_ok(raw(encode(wide, "TIFF"), ext="tif")))
    assert [p[0] for p in got] == [0, 255, 128]  # out of 16-bit range: min-max stretched


# --------------------------------------------------------------------------- sizes


def test_one_pixel_image_is_kept():
    s = decode_ok(raw(encode(Image.new("RGB", (1, 1), (9, 8, 7)))))
    assert s.image.size == (1, 1) and pixels(s) == [(9, 8, 7)]
    assert "original_size" not in s.meta


def test_large_image_is_downscaled_keeping_aspect():
    s = decode_ok(raw(encode(Image.new("RGB", (200, 100), (0, 0, 255)))), max_image_side=64)
    assert s.image.size == (64, 32) and s.meta["original_size"] == [200, 100]
    assert s.image.getpixel((10, 10)) == (0, 0, 255)


def test_10000x10000_jpeg_is_downscaled():
    data = encode(Image.new("L", (10000, 10000), 200), "JPEG")
    s = decode_ok(raw(data, ext="jpg"))
    assert s.image.size == (4096, 4096) and s.meta["original_size"] == [10000, 10000]
    assert all(abs(c - 200) <= 2 for c in s.image.getpixel((2000, 2000)))


def test_10000x10000_png_is_downscaled():
    data = encode(Image.new("L", (10000, 10000), 50))
    s = decode_ok(raw(data), max_image_side=1024)
    assert s.image.size == (1024, 1024) and s.image.getpixel((0, 0)) == (50, 50, 50)


def test_pixel_limit_refuses_before_decoding():
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape
        reason = decode_bad(raw(png_header(10000, 10000)), max_image_pixels=50_000_000)
        assert reason == "image_too_large: 10000x10000"
        reason = decode_bad(raw(png_header(100_000, 100_000)))  # beyond Pillow's hard limit too
        assert reason == "image_too_large: 10000000000 pixels over Pillow's decompression bomb limit"
    assert Image.MAX_IMAGE_PIXELS == before  # Pillow's global is never touched


def test_pillow_decompression_bomb_error_is_caught():
    # our limit lifted above Pillow's hard limit (2 * MAX_IMAGE_PIXELS): Pillow refuses first
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 100
    reason = decode_bad(raw(png_header(side, side)), max_image_pixels=10**12)
    assert reason.startswith("image_too_large: ") and "decompression bomb" in reason


def test_cielab_is_converted_colorimetrically():
    lab = Image.new("LAB", (2, 1))
    lab.putdata([(136, 208, 195), (255, 128, 128)])  # sRGB red, white (a/b offset by 128)
    red, white = pixels(decode_ok(raw(encode(lab, "TIFF"), ext="tif")))
    assert red[0] > 240 and red[1] < 20 and red[2] < 20
    assert all(c > 250 for c in white)


def test_bad_size_options_are_config_errors_not_bad_samples():
    with pytest.raises(ValueError, match="max_image_side"):
        decode_sample(raw(encode(Image.new("RGB", (4, 4)))), BadSampleStats(), max_image_side=0)
