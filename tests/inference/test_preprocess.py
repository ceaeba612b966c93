from __future__ import annotations

import cv2
import numpy as np
import pytest

from service.inference.metadata import InputSpec
from service.inference.preprocess import (
    BatchBuffers,
    Transform,
    gray,
    letterbox,
    make_batch,
    paste,
    resize_onto,
    stretch,
    to_layout,
)


def image_with_block(h: int, w: int, x0: int, y0: int, bw: int, bh: int) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[y0:y0 + bh, x0:x0 + bw] = 200
    return img


def centroid(img: np.ndarray, background: float = 0.0) -> np.ndarray:
    """Intensity-weighted centroid (pixel-centre convention) of channel 0 above background."""
    v = np.clip(img[..., 0].astype(np.float64) - background, 0.0, None)
    ys, xs = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    return np.array([(v * xs).sum() / v.sum(), (v * ys).sum() / v.sum()])


def spec(**kw: object) -> InputSpec:
    base: dict[str, object] = dict(
        name="images", height=240, width=320, layout="NHWC", dtype="uint8", color="BGR",
        normalization="in-graph", resize="letterbox", pad_value=114,
    )
    base.update(kw)
    return InputSpec(**base)  # type: ignore[arg-type]


def test_letterbox_halves_640x480_without_padding() -> None:
    out, t = letterbox(np.zeros((480, 640, 3), np.uint8), (240, 320))
    assert out.shape == (240, 320, 3)
    assert (t.scale_x, t.scale_y, t.pad_x, t.pad_y) == (0.5, 0.5, 0, 0)
    # pixel-centre convention: the source's top-left pixel centre is (0, 0)
    np.testing.assert_allclose(t.to_model([0.0, 0.0]), [-0.25, -0.25])
    np.testing.assert_allclose(t.to_model([1.0, 1.0]), [0.25, 0.25])


def test_letterbox_pads_centred_with_the_pad_value() -> None:
    out, t = letterbox(np.zeros((360, 640, 3), np.uint8), (240, 320), pad_value=114)
    assert (t.pad_x, t.pad_y, t.scale_x, t.scale_y) == (0, 30, 0.5, 0.5)
    assert (out[:30] == 114).all() and (out[-30:] == 114).all()
    assert (out[30:210] == 0).all()


@pytest.mark.parametrize(("h", "w"), [(480, 640), (360, 640), (600, 400), (100, 100), (481, 641)])
def test_round_trip_is_exact(h: int, w: int) -> None:
    _, t = letterbox(np.zeros((h, w, 3), np.uint8), (240, 320))
    pts = np.random.default_rng(0).uniform(-10, max(h, w) + 10, size=(50, 2))
    np.testing.assert_allclose(t.to_source(t.to_model(pts)), pts, atol=1e-3)
    _, s = stretch(np.zeros((h, w, 3), np.uint8), (240, 320))
    np.testing.assert_allclose(s.to_source(s.to_model(pts)), pts, atol=1e-3)


@pytest.mark.parametrize(("h", "w", "block"), [
    (480, 640, (101, 50, 6, 4)),  # exact 2x: INTER_AREA averages 2x2 blocks
    (360, 640, (300, 200, 8, 10)),  # 2x with vertical padding
    (720, 960, (333, 222, 9, 9)),  # 3x
])
def test_pixels_land_where_the_transform_says(h: int, w: int, block: tuple[int, ...]) -> None:
    src = image_with_block(h, w, *block)
    out, t = letterbox(src, (240, 320), pad_value=0)
    np.testing.assert_allclose(centroid(out), t.to_model(centroid(src)), atol=1e-6)


def test_non_integer_scale_keeps_the_centroid_within_uint8_rounding() -> None:
    src = image_with_block(375, 500, 201, 150, 13, 11)  # scale 0.64
    out, t = letterbox(src, (240, 320), pad_value=0)
    assert t.scale_x == pytest.approx(0.64)
    np.testing.assert_allclose(centroid(out), t.to_model(centroid(src)), atol=0.03)


def test_upscale_uses_the_same_convention() -> None:
    src = image_with_block(60, 80, 30, 20, 4, 4)
    out, t = stretch(src, (240, 320))  # 4x up, bilinear
    np.testing.assert_allclose(centroid(out), t.to_model(centroid(src)), atol=1e-6)


def test_transform_maps_boxes_and_keypoint_arrays_of_any_shape() -> None:
    t = Transform(0.5, 0.5, 0, 30, 640, 360)
    pts = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    assert t.to_model(pts).shape == pts.shape
    np.testing.assert_allclose(t.to_source(t.to_model(pts)), pts, atol=1e-4)


def test_to_layout_nchw_rgb_unit_float() -> None:
    batch = np.zeros((2, 4, 5, 3), np.uint8)
    batch[..., 0] = 255  # blue in BGR
    x = to_layout(batch, spec(layout="NCHW", dtype="float32", color="RGB", normalization="unit"))
    assert x.shape == (2, 3, 4, 5) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_allclose(x[:, 2], 1.0)  # blue is the last channel in RGB
    np.testing.assert_allclose(x[:, :2], 0.0)


def test_to_layout_keeps_uint8_bgr_nhwc_untouched() -> None:
    batch = np.random.default_rng(1).integers(0, 255, (1, 4, 5, 3), dtype=np.uint8)
    x = to_layout(batch, spec())
    assert x.dtype == np.uint8
    np.testing.assert_array_equal(x, batch)


@pytest.mark.parametrize(("layout", "dtype", "normalization"), [
    ("NCHW", "float32", "unit"), ("NHWC", "uint8", "in-graph"), ("NHWC", "float16", "unit"),
])
@pytest.mark.parametrize("pooled", [False, True])
def test_gray_input_is_opencvs_bgr_to_gray_in_the_models_layout(
    layout: str, dtype: str, normalization: str, pooled: bool
) -> None:
    batch = np.random.default_rng(3).integers(0, 256, (3, 6, 7, 3), dtype=np.uint8)
    buffers = BatchBuffers() if pooled else None
    x = to_layout(batch, spec(layout=layout, dtype=dtype, color="GRAY",
                              normalization=normalization), buffers)
    expected = np.stack([cv2.cvtColor(b, cv2.COLOR_BGR2GRAY) for b in batch]).astype(np.float64)
    if normalization == "unit":
        expected /= 255.0
    assert x.shape == ((3, 1, 6, 7) if layout == "NCHW" else (3, 6, 7, 1))
    assert x.dtype == np.dtype(dtype) and x.flags.c_contiguous
    np.testing.assert_allclose(x.reshape(3, 6, 7), expected, rtol=1e-3 if dtype == "float16"
                               else 1e-6)
    if buffers is not None and dtype != "uint8":
        assert buffers.lent == 1  # the gray scratch batch went back; only the result is out


def test_gray_of_a_gray_frame_stored_as_bgr_is_that_frame() -> None:
    plane = np.random.default_rng(4).integers(0, 256, (1, 5, 9), dtype=np.uint8)
    np.testing.assert_array_equal(gray(np.repeat(plane[..., None], 3, axis=3))[..., 0], plane)
    one = plane[..., None]
    assert gray(one) is one  # a gray batch is not converted again


@pytest.mark.parametrize("size", [(40, 64), (64, 40)])  # padding above/below, left/right
def test_a_gray_image_letterboxes_like_its_plane(size: tuple[int, int]) -> None:
    """One-channel images (a gray model's frames) go through resize_onto and paste as
    (H, W, 1): the same pixels as the 2-D plane resized and pasted."""
    plane = np.random.default_rng(6).integers(0, 256, (30, 50), dtype=np.uint8)
    h, w = size
    new_w, new_h = (w, round(30 * w / 50)) if w / 50 < h / 30 else (round(50 * h / 30), h)
    top, left = (h - new_h) // 2, (w - new_w) // 2
    out = np.empty((h, w, 1), np.uint8)
    got = resize_onto(plane[..., None], (new_w, new_h), cv2.INTER_LINEAR, size, top, left,
                      114, out)
    expected = np.full(size, 114, np.uint8)
    expected[top:top + new_h, left:left + new_w] = cv2.resize(
        plane, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    assert got is out
    np.testing.assert_array_equal(got[..., 0], expected)
    pasted = paste(plane[..., None], (40, 64), 5, 7, 114)
    assert pasted.shape == (40, 64, 1) and (pasted[5:35, 7:57, 0] == plane).all()


def test_make_batch_stacks_mixed_sizes_with_one_transform_each() -> None:
    images = [np.zeros((480, 640, 3), np.uint8), np.zeros((100, 300, 3), np.uint8)]
    x, transforms = make_batch(images, spec())
    assert x.shape == (2, 240, 320, 3)
    assert transforms[0].src_width == 640 and transforms[1].src_width == 300
    assert transforms[1].pad_y > 0


def test_rejects_non_bgr_uint8_images() -> None:
    with pytest.raises(ValueError, match="uint8"):
        letterbox(np.zeros((10, 10, 3), np.float32), (240, 320))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="HxWx3"):
        letterbox(np.zeros((10, 10), np.uint8), (240, 320))


@pytest.mark.parametrize("color", ["RGB", "BGR"])
@pytest.mark.parametrize("normalization", ["unit", "in-graph"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_nchw_float_conversion_equals_the_plain_numpy_chain(
    color: str, normalization: str, dtype: str
) -> None:
    batch = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    spec = InputSpec("images", 5, 7, "NCHW", dtype, color, normalization, "letterbox", 114)  # type: ignore[arg-type]
    x = batch[..., ::-1] if color == "RGB" else batch
    ref = x.transpose(0, 3, 1, 2).astype(dtype)
    if normalization == "unit":
        ref = ref * np.dtype(dtype).type(1.0 / 255.0)
    out = to_layout(batch, spec)
    assert out.dtype == np.dtype(dtype) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("color", ["RGB", "BGR"])
@pytest.mark.parametrize("normalization", ["unit", "in-graph"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("resize", ["letterbox", "stretch"])
def test_a_batch_converted_by_content_rows_equals_the_whole_conversion(
    color: str, normalization: str, dtype: str, resize: str
) -> None:
    """make_batch converts only the rows that hold an image and fills the padding rows
    with the pad value converted: the tensor must equal converting every row, whatever a
    reused batch array held before (NaN here)."""
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, size, dtype=np.uint8)
              for size in ((9, 32, 3), (48, 20, 3), (24, 32, 3), (1, 64, 3), (25, 31, 3))]
    s = spec(height=24, width=32, layout="NCHW", dtype=dtype, color=color,
             normalization=normalization, resize=resize)
    buffers = BatchBuffers()
    stale = buffers.take((len(images), 3, 24, 32), dtype)
    stale[...] = np.nan
    buffers.give([stale])
    out, transforms = make_batch(images, s, buffers)
    assert out is stale
    fitted, same = make_batch(images, spec(height=24, width=32, resize=resize))
    assert same == transforms
    if resize == "letterbox":  # rows of padding above and below the wide images
        assert [t.content_rows for t in transforms][:2] == [(7, 16), (0, 24)]
    np.testing.assert_array_equal(out, to_layout(fitted, s))


@pytest.mark.parametrize("size", [(480, 640), (300, 200), (640, 640), (17, 640)])
def test_letterbox_and_stretch_into_a_batch_row_equal_the_fresh_result(
    size: tuple[int, int],
) -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
    row = np.full((320, 320, 3), 7, np.uint8)  # stale content must not survive
    for fn in (lambda out=None: letterbox(image, (320, 320), 114, out),
               lambda out=None: stretch(image, (320, 320), out)):
        fresh, t1 = fn()
        row[...] = 7
        into, t2 = fn(row)
        assert into is row and t1 == t2
        np.testing.assert_array_equal(row, fresh)


@pytest.mark.parametrize("size", [(432, 768), (768, 432), (100, 100)])
@pytest.mark.parametrize("strided", [False, True])
def test_resize_onto_equals_resizing_then_pasting(size: tuple[int, int], strided: bool) -> None:
    """OpenCV resizes straight into the canvas; where it cannot write there (a canvas
    whose pixels are not contiguous), the pixels are copied in: the same canvas."""
    image = np.random.default_rng(4).integers(0, 256, (*size, 3), dtype=np.uint8)
    h, w = size
    r = min(320 / h, 320 / w)
    new_w, new_h = round(w * r), round(h * r)
    top, left = (320 - new_h) // 2, (320 - new_w) // 2
    for interp in (cv2.INTER_LINEAR, cv2.INTER_AREA):
        want = paste(cv2.resize(image, (new_w, new_h), interpolation=interp), (320, 320),
                     top, left, 114)
        backing = np.full((320, 640 if strided else 320, 3), 7, np.uint8)
        canvas = backing[:, ::2] if strided else backing
        got = resize_onto(image, (new_w, new_h), interp, (320, 320), top, left, 114, canvas)
        assert got is canvas
        np.testing.assert_array_equal(canvas, want)


def test_paste_fills_exactly_the_border_with_the_pad_value() -> None:
    image = np.full((3, 4, 3), 200, np.uint8)
    canvas = paste(image, (7, 9), 2, 3, 114, np.zeros((7, 9, 3), np.uint8))
    inside = np.zeros((7, 9), bool)
    inside[2:5, 3:7] = True
    assert (canvas[inside] == 200).all() and (canvas[~inside] == 114).all()


def test_batch_buffers_lend_each_array_once_and_reuse_what_is_given_back() -> None:
    buffers = BatchBuffers(keep=2)
    a = buffers.take((2, 4, 4, 3), np.uint8)
    b = buffers.take((2, 4, 4, 3), np.uint8)
    assert a is not b and buffers.lent == 2  # two batches in flight never share memory
    buffers.give([a])
    assert buffers.take((2, 4, 4, 3), np.uint8) is a
    assert buffers.take((2, 4, 4, 3), np.float32) is not a  # another dtype, another array
    assert buffers.take((1, 4, 4, 3), np.uint8).shape == (1, 4, 4, 3)


def test_batch_buffers_ignore_arrays_they_did_not_lend() -> None:
    buffers = BatchBuffers()
    mine = buffers.take((3,), np.float32)
    foreign = np.empty((3,), np.float32)
    buffers.give([foreign, mine[:2]])  # a caller's array, a view of a lent one
    assert buffers.take((3,), np.float32) is not foreign
    buffers.give([mine, mine])  # given twice: kept once
    assert buffers.take((3,), np.float32) is mine
    assert buffers.take((3,), np.float32) is not mine


def test_batch_buffers_forget_dropped_arrays_and_keep_a_bounded_number() -> None:
    import gc

    buffers = BatchBuffers(keep=2)
    taken = [buffers.take((8,), np.uint8) for _ in range(5)]
    assert buffers.lent == 5
    buffers.give(taken[:4])
    given = taken[:4]
    del taken
    gc.collect()
    assert buffers.lent == 0  # the one never given back was freed and forgotten
    again = [buffers.take((8,), np.uint8) for _ in range(3)]
    assert buffers.lent == 3
    assert sum(any(a is g for g in given) for a in again) == 2  # two of the four kept
