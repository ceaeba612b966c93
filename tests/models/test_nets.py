"""The network's output contract and its in-graph decoder."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the model workspace needs the [train] extra")

from models.nets import (  # noqa: E402
    ExportModel,
    HeadOutputs,
    KeypointNet,
    NetConfig,
    count_macs,
    decode,
    grid_to_px,
)

pytestmark = pytest.mark.train

C, K, H, W = 4, 5, 60, 80


def _px(g: Any) -> Any:
    """Grid cells -> input pixels (stride 4, pixel-centre convention)."""
    return np.asarray(g, np.float64) * 4 + 1.5


def test_grid_to_px_is_the_stride_4_pixel_centre_map() -> None:
    assert grid_to_px(0.0) == 1.5 and grid_to_px(2.5) == 11.5


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def _empty_heads() -> dict[str, Any]:
    return {
        "hm": torch.full((1, C, H, W), -9.0),
        "wh": torch.zeros(1, 2, H, W),
        "off": torch.zeros(1, 2, H, W),
        "kreg": torch.zeros(1, 2 * K, H, W),
        "khm": torch.full((1, C * K, H, W), -9.0),
        "koff": torch.zeros(1, 2 * C * K, H, W),
    }


def test_a_known_peak_decodes_to_the_right_row() -> None:
    cfg = NetConfig(num_classes=C, max_det=6)
    heads = _empty_heads()
    cls, cx, cy = 2, 30, 20
    heads["hm"][0, cls, cy, cx] = _logit(0.9)
    heads["hm"][0, cls, cy, cx + 1] = _logit(0.5)  # a shoulder of the peak: suppressed
    heads["wh"][0, :, cy, cx] = torch.tensor([10.0, 6.0])
    heads["off"][0, :, cy, cx] = torch.tensor([0.25, -0.5])
    kreg = np.array([[-4.2, -2.1], [3.6, 1.2], [0.3, 2.7], [-2.0, 0.4], [5.0, -2.5]], np.float32)
    heads["kreg"][0, :, cy, cx] = torch.from_numpy(kreg.reshape(-1))
    expected_grid = kreg + [cx, cy]
    # keypoint 0..3: heatmap peaks at the nearest cell plus a sub-cell offset
    true_grid = expected_grid.copy()
    for q in range(4):
        px, py = np.round(expected_grid[q]).astype(int)
        px += 1 if q == 1 else 0  # the peak may sit a cell away from the regression
        sub = np.array([0.3, -0.2]) if q % 2 else np.array([-0.4, 0.1])
        true_grid[q] = (px + sub[0], py + sub[1])
        chan = cls * K + q
        heads["khm"][0, chan, py, px] = _logit(0.8)
        heads["koff"][0, 2 * chan, py, px] = float(sub[0])
        heads["koff"][0, 2 * chan + 1, py, px] = float(sub[1])
    # keypoint 4 has no peak (occluded): it keeps its regression and scores low
    # a distractor peak of the same channel further away must not win
    heads["khm"][0, cls * K + 0, 25, 10] = _logit(0.99)
    # another class's keypoint heatmap at the same place must not be read
    heads["khm"][0, 0 * K + 4, int(round(expected_grid[4, 1])), int(round(expected_grid[4, 0]))] = (
        _logit(0.99)
    )
    rows = decode(HeadOutputs(**heads), cfg).numpy()
    assert rows.shape == (1, 6, 6 + 3 * K) and rows.dtype == np.float32
    row = rows[0, 0]
    centre = np.array([cx + 0.25, cy - 0.5])
    box = np.concatenate([centre - [5.0, 3.0], centre + [5.0, 3.0]])
    np.testing.assert_allclose(row[:4], [_px(v) for v in box], atol=1e-5)
    assert row[4] == pytest.approx(0.9, abs=1e-6) and row[5] == cls
    kp = row[6:].reshape(K, 3)
    np.testing.assert_allclose(kp[:4, :2], _px(true_grid[:4]), atol=1e-4)
    np.testing.assert_allclose(kp[:4, 2], 0.8, atol=1e-5)
    np.testing.assert_allclose(kp[4, :2], _px(expected_grid[4]), atol=1e-4)
    assert kp[4, 2] < 0.01
    # no other peak: the remaining rows are padding, all zero
    assert not rows[0, 1:].any()


def test_rows_are_sorted_by_score_and_class_ids_come_from_the_channel() -> None:
    cfg = NetConfig(num_classes=C, max_det=5)
    heads = _empty_heads()
    peaks = [(0, 5, 5, 0.6), (3, 40, 50, 0.95), (1, 20, 70, 0.7)]
    for cls, y, x, p in peaks:
        heads["hm"][0, cls, y, x] = _logit(p)
    rows = decode(HeadOutputs(**heads), cfg).numpy()[0]
    np.testing.assert_allclose(rows[:3, 4], [0.95, 0.7, 0.6], atol=1e-6)
    assert rows[:3, 5].tolist() == [3.0, 1.0, 0.0]
    centres = (rows[:3, 0:2] + rows[:3, 2:4]) / 2
    np.testing.assert_allclose(centres, [[_px(50), _px(40)],
                                         [_px(70), _px(20)],
                                         [_px(5), _px(5)]], atol=1e-5)
    assert not rows[3:].any()


def test_export_model_takes_uint8_nhwc_and_returns_the_end2end_rows() -> None:
    cfg = NetConfig(num_classes=C, widths=(8, 8, 16, 16), blocks=(0, 0, 1), neck=8, head=8,
                    max_det=7)
    model = ExportModel(KeypointNet(cfg)).eval()
    images = torch.randint(0, 256, (3, 240, 320, 3), dtype=torch.uint8)
    with torch.no_grad():
        out = model(images)
        single = model(images[1:2])
    assert out.shape == (3, 7, 6 + 3 * K) and out.dtype == torch.float32
    torch.testing.assert_close(single, out[1:2], atol=1e-5, rtol=1e-5)
    scores = out[..., 4]
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    assert torch.all((out[..., 5] >= 0) & (out[..., 5] < C))


def test_the_default_network_is_sized_for_one_cpu_core() -> None:
    net = KeypointNet(NetConfig(num_classes=C))
    macs = count_macs(net)
    params = sum(p.numel() for p in net.parameters())
    assert 50e6 < macs < 600e6
    assert params * 4 < 10e6  # the ONNX file stays well under 10 MB
