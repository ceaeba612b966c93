"""The default LineWatch keypoint network and its in-graph decoder.

``KeypointNet`` is a small CenterNet-style, multi-class, multi-instance keypoint
CNN.  From a 240x320 image it predicts, on a stride-4 grid (60x80):

- ``hm``   (C)      per-class centre heatmap logits;
- ``wh``   (2)      box width and height at the centre cell, in grid cells;
- ``off``  (2)      sub-cell offset of the box centre;
- ``kreg`` (2K)     displacement of each keypoint slot from the centre cell, in cells;
- ``khm``  (C*K)    per-(class, keypoint) heatmap logits;
- ``koff`` (2*C*K)  sub-cell offset of each (class, keypoint) around its peak.

``decode`` turns these into the end-to-end rows ``[B, N, 6 + 3K]`` (x1, y1, x2, y2,
score, class id, then x, y, score per keypoint, in model-input pixels with the
centre of the top-left pixel at (0, 0)).  It runs inside the exported ONNX graph:
centre peaks by 3x3 max-pool NMS and top-k (peaks under ``min_score`` become
padding rows, all zero); each keypoint first comes from the
centre's regression, then snaps to the best peak of its own heatmap in a small
window around it (the peak value, weighted by closeness, picks the cell) plus that
cell's sub-cell offset.  A keypoint whose heatmap peak is under ``kpt_min_peak``
(occluded or outside the frame) keeps the regressed position; its score is the
heatmap value, so it falls for keypoints the network cannot see.

``ExportModel`` wraps net and decoder with the input contract: uint8
``[B, 240, 320, 3]`` NHWC BGR in, cast, normalised and transposed in the graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INPUT_HW: tuple[int, int] = (240, 320)
STRIDE = 4


@dataclass(frozen=True)
class NetConfig:
    """Shape of the network (saved in checkpoints; ``from_dict`` restores it)."""

    num_classes: int = 3
    num_keypoints: int = 5
    widths: tuple[int, int, int, int] = (16, 32, 64, 96)  # at stride 2, 4, 8, 16
    blocks: tuple[int, int, int] = (0, 1, 2)  # residual blocks at stride 4, 8, 16
    neck: int = 32  # channels of the top-down path
    head: int = 32  # channels of the shared 3x3 head conv
    max_det: int = 20
    window: int = 2  # keypoint refinement radius, in grid cells
    window_sigma: float = 1.5  # closeness weight of the refinement, in grid cells
    kpt_min_peak: float = 0.1  # below this heatmap value a keypoint keeps its regression
    min_score: float = 0.05  # centre peaks under this are padding rows (all zero)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetConfig:
        fields = dict(data)
        fields["widths"] = tuple(fields["widths"])
        fields["blocks"] = tuple(fields["blocks"])
        return cls(**fields)

    @property
    def head_channels(self) -> dict[str, int]:
        c, k = self.num_classes, self.num_keypoints
        return {"hm": c, "wh": 2, "off": 2, "kreg": 2 * k, "khm": c * k, "koff": 2 * c * k}


class HeadOutputs(NamedTuple):
    """Raw head maps, each ``[B, ch, H/4, W/4]``."""

    hm: Tensor
    wh: Tensor
    off: Tensor
    kreg: Tensor
    khm: Tensor
    koff: Tensor


def _conv(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = _conv(ch, ch)
        self.conv2 = nn.Sequential(nn.Conv2d(ch, ch, 3, 1, 1, bias=False), nn.BatchNorm2d(ch))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.conv2(self.conv1(x)))


def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    layers: list[nn.Module] = [_conv(cin, cout, stride)]
    layers += [_Residual(cout) for _ in range(blocks)]
    return nn.Sequential(*layers)


class KeypointNet(nn.Module):
    """Backbone (stride 16) + top-down neck to stride 4 + one shared head."""

    def __init__(self, config: NetConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or NetConfig()
        w2, w4, w8, w16 = cfg.widths
        self.stem = _conv(3, w2, 2)  # stride 2
        self.s4 = _stage(w2, w4, cfg.blocks[0], 2)
        self.s8 = _stage(w4, w8, cfg.blocks[1], 2)
        self.s16 = _stage(w8, w16, cfg.blocks[2], 2)
        self.lat16 = nn.Conv2d(w16, cfg.neck, 1)
        self.lat8 = nn.Conv2d(w8, cfg.neck, 1)
        self.lat4 = nn.Conv2d(w4, cfg.neck, 1)
        self.smooth8 = _conv(cfg.neck, cfg.neck)
        self.head_conv = _conv(cfg.neck, cfg.head)
        self.head_out = nn.Conv2d(cfg.head, sum(cfg.head_channels.values()), 1)
        self._init_head()

    def _init_head(self) -> None:
        # Heatmap logits start at p=0.01 (focal-loss prior), regressions at 0.
        nn.init.normal_(self.head_out.weight, std=0.001)
        bias = torch.zeros(self.head_out.out_channels)
        start = 0
        for name, ch in self.config.head_channels.items():
            if name in ("hm", "khm"):
                bias[start : start + ch] = -4.6
            start += ch
        assert self.head_out.bias is not None
        with torch.no_grad():
            self.head_out.bias.copy_(bias)

    def forward(self, x: Tensor) -> HeadOutputs:
        """``x``: float ``[B, 3, 240, 320]``, already normalised (see ``normalise``)."""
        f4 = self.s4(self.stem(x))
        f8 = self.s8(f4)
        f16 = self.s16(f8)
        p8 = self.lat8(f8) + F.interpolate(self.lat16(f16), scale_factor=2.0, mode="nearest")
        p8 = self.smooth8(p8)
        p4 = self.lat4(f4) + F.interpolate(p8, scale_factor=2.0, mode="nearest")
        out = self.head_out(self.head_conv(p4))
        parts = torch.split(out, list(self.config.head_channels.values()), dim=1)
        return HeadOutputs(*parts)


def normalise(images_nhwc_uint8: Tensor) -> Tensor:
    """uint8 ``[B, H, W, 3]`` BGR -> float ``[B, 3, H, W]`` in about [-2, 2]."""
    x = images_nhwc_uint8.permute(0, 3, 1, 2).float()
    return (x - 127.5) * (1.0 / 64.0)


def grid_to_px(g: Tensor | float, stride: int = STRIDE) -> Tensor | float:
    """Grid cell coordinate -> input pixel (pixel-centre convention)."""
    return g * stride + (stride - 1) / 2.0


def _gather_flat(maps: Tensor, index: Tensor) -> Tensor:
    """``maps`` [B, X] gathered at ``index`` [B, ...] (int64) -> [B, ...]."""
    flat_index = index.reshape(index.shape[0], -1)
    return torch.gather(maps, 1, flat_index).reshape(index.shape)


def decode(heads: HeadOutputs, config: NetConfig, stride: int = STRIDE) -> Tensor:
    """Raw heads -> ``[B, max_det, 6 + 3K]`` rows sorted by score (export-safe torch)."""
    c, k, n = config.num_classes, config.num_keypoints, config.max_det
    b = heads.hm.shape[0]
    h, w = heads.hm.shape[2], heads.hm.shape[3]
    hw = h * w

    heat = torch.sigmoid(heads.hm)
    keep = (F.max_pool2d(heat, 3, 1, 1) == heat) & (heat >= config.min_score)
    peaks = heat * keep.to(heat.dtype)
    scores, idx = torch.topk(peaks.reshape(b, c * hw), n, dim=1)  # [B, N]
    cls = torch.div(idx, hw, rounding_mode="floor")
    pos = idx - cls * hw
    ys = torch.div(pos, w, rounding_mode="floor")
    xs = pos - ys * w
    xs_f, ys_f = xs.to(heat.dtype), ys.to(heat.dtype)

    def at_centre(maps: Tensor) -> Tensor:  # [B, ch, H, W] -> [B, N, ch]
        ch = maps.shape[1]
        flat = maps.reshape(b, ch, hw)
        return torch.gather(flat, 2, pos.unsqueeze(1).expand(-1, ch, -1)).permute(0, 2, 1)

    wh = at_centre(heads.wh)
    off = at_centre(heads.off)
    kreg = at_centre(heads.kreg)  # [B, N, 2K] as x0, y0, x1, y1, ...
    cx = xs_f + off[..., 0]
    cy = ys_f + off[..., 1]
    half_w = wh[..., 0].clamp(min=0.0) * 0.5
    half_h = wh[..., 1].clamp(min=0.0) * 0.5
    box = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)

    kx = xs_f.unsqueeze(-1) + kreg[..., 0::2]  # [B, N, K] regressed, grid cells
    ky = ys_f.unsqueeze(-1) + kreg[..., 1::2]

    # Local refinement in each keypoint's own heatmap.
    r = config.window
    span = torch.arange(-r, r + 1, device=heat.device)
    dy, dx = torch.meshgrid(span, span, indexing="ij")
    dx, dy = dx.reshape(-1), dy.reshape(-1)  # [WW]
    bx = torch.round(kx).to(torch.int64)
    by = torch.round(ky).to(torch.int64)
    ix = (bx.unsqueeze(-1) + dx).clamp(0, w - 1)  # [B, N, K, WW]
    iy = (by.unsqueeze(-1) + dy).clamp(0, h - 1)
    chan = cls.unsqueeze(-1) * k + torch.arange(k, device=heat.device)  # [B, N, K]
    cell = iy * w + ix
    kheat = torch.sigmoid(heads.khm).reshape(b, c * k * hw)
    vals = _gather_flat(kheat, chan.unsqueeze(-1) * hw + cell)
    d2 = (ix.to(heat.dtype) - kx.unsqueeze(-1)) ** 2 + (iy.to(heat.dtype) - ky.unsqueeze(-1)) ** 2
    weight = vals * torch.exp(d2 * (-0.5 / config.window_sigma**2))
    best = torch.argmax(weight, dim=-1, keepdim=True)
    kscore = torch.gather(vals, -1, best).squeeze(-1)
    best_cell = torch.gather(cell, -1, best).squeeze(-1)  # [B, N, K]
    koff = heads.koff.reshape(b, c * k * 2 * hw)
    ox = _gather_flat(koff, (chan * 2) * hw + best_cell)
    oy = _gather_flat(koff, (chan * 2 + 1) * hw + best_cell)
    best_y = torch.div(best_cell, w, rounding_mode="floor")
    best_x = best_cell - best_y * w
    rx = best_x.to(heat.dtype) + ox
    ry = best_y.to(heat.dtype) + oy
    use = kscore >= config.kpt_min_peak
    fx = torch.where(use, rx, kx)
    fy = torch.where(use, ry, ky)

    box_px = grid_to_px(box, stride)
    assert isinstance(box_px, Tensor)
    kx_px = grid_to_px(fx, stride)
    ky_px = grid_to_px(fy, stride)
    assert isinstance(kx_px, Tensor) and isinstance(ky_px, Tensor)
    kpts = torch.stack([kx_px, ky_px, kscore], dim=-1).reshape(b, n, 3 * k)
    rows = torch.cat([box_px, scores.unsqueeze(-1), cls.to(heat.dtype).unsqueeze(-1), kpts], -1)
    valid = (scores > 0).to(rows.dtype).unsqueeze(-1)
    return rows * valid


class ExportModel(nn.Module):
    """uint8 NHWC BGR images -> end-to-end detections (the ONNX graph)."""

    def __init__(self, net: KeypointNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: Tensor) -> Tensor:
        return decode(self.net(normalise(images)), self.net.config)


def count_macs(net: KeypointNet, hw: tuple[int, int] = INPUT_HW) -> int:
    """Multiply-accumulates of the convolutions for one image (decoder excluded)."""
    total = 0

    def hook(module: nn.Module, _inp: Any, out: Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Conv2d)
        kh, kw = module.kernel_size
        per_out = kh * kw * module.in_channels // module.groups
        total += int(out.numel() // out.shape[0]) * per_out

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            net.eval()
            net(torch.zeros(1, 3, *hw))
    finally:
        for handle in handles:
            handle.remove()
    return total
