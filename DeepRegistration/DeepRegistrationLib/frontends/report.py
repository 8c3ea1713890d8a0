"""HTML quality-assurance report of one registration, for a radiologist reviewing the result.

`write_report` writes `report.html` and the PNG figures it links (relative links, so the folder can be moved
or zipped) into one folder. Every volume shown lives on the fixed grid: the fixed image, the moving image resampled
with the identity ("before"), the warped moving image ("after"), the displacement field and its Jacobian
determinant (docs/CONVENTIONS.md §3, §6).

Display convention: **radiological**, as in 3D Slicer's default views. Axial slices are seen from the feet (patient
right on the image left, anterior up), coronal slices from the front (patient right on the image left, superior up),
sagittal slices from the patient's left (anterior on the image left, superior up). The slice planes are the native
voxel planes of the fixed grid nearest to the anatomical planes, chosen and flipped from the grid's affine
(for a RAS-aligned grid the axial slice is constant k); every panel carries its orientation letters and a mm scale.
"""

from __future__ import annotations

import datetime
import html
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.patheffects import withStroke
from nibabel.orientations import io_orientation
from scipy.ndimage import gaussian_filter

from ..engine.results import LabelMetrics, LandmarkMetrics, Metrics, RegistrationResult, StructureScores
from ..core.errors import InputError
from ..core.field import DisplacementField, apply_field
from ..core.geometry import Grid
from ..core.image import Image

CONVENTION = ("Radiological convention (as 3D Slicer): axial slices seen from the feet and coronal slices from the "
              "front, patient's right on the image left; sagittal slices seen from the patient's left, anterior "
              "on the image left. Letters on each panel: R/L right/left, A/P anterior/posterior, S/I "
              "superior/inferior.")

_PLANES = (
    # name, RAS axis held constant, (RAS axis, sign) pointing to the screen right, (RAS axis, sign) pointing up
    ("Axial", 2, (0, -1), (1, 1)),
    ("Coronal", 1, (0, -1), (2, 1)),
    ("Sagittal", 0, (1, -1), (2, 1)),
)
_FOLD_COLOUR = "#00e000"
_GRID_COLOUR = "#ffd400"
_DPI = 110
MIN_PANEL_INCHES = 2.4
"""Narrower slice panels are centred in a box this wide, so that their titles fit."""
DICE_DROP = 0.05
"""A structure whose Dice falls by more than this is named in the report's checks."""
ANATOMY_LEVELS = (0.3, 0.65)
"""Iso-intensities (of the window-normalised fixed image) drawn as thin lines over the Jacobian map."""
MAX_LEGEND_LABELS = 24
"""Structure outlines get a colour legend up to this many labels."""


@dataclass(frozen=True)
class SlicePlane:
    """A native voxel plane of a grid displayed as an anatomical plane.

    Displayed pixel (row, col) sits at screen position x = col · col_spacing (mm, to the right),
    y = row · row_spacing (mm, downwards); `col_vec` and `row_vec` are the RAS unit vectors of those screen
    directions.
    """

    name: str
    normal: int
    index: int
    row_axis: int
    col_axis: int
    row_flip: bool
    col_flip: bool
    row_vec: np.ndarray
    col_vec: np.ndarray
    row_spacing: float
    col_spacing: float
    position: str

    def take(self, volume: np.ndarray) -> np.ndarray:
        """The displayed slice [rows, cols, ...] of a volume [I, J, K, ...] on the grid."""
        plane = np.take(volume, self.index, axis=self.normal)
        if [a for a in range(3) if a != self.normal] != [self.row_axis, self.col_axis]:
            plane = np.swapaxes(plane, 0, 1)
        if self.row_flip:
            plane = plane[::-1]
        if self.col_flip:
            plane = plane[:, ::-1]
        return np.ascontiguousarray(plane)

    def extent(self, shape: tuple[int, ...]) -> tuple[float, float, float, float]:
        """imshow extent (left, right, bottom, top) in screen mm for a displayed slice of `shape`."""
        rows, cols = shape[:2]
        return (-0.5 * self.col_spacing, (cols - 0.5) * self.col_spacing,
                (rows - 0.5) * self.row_spacing, -0.5 * self.row_spacing)

    def size_mm(self, grid: Grid) -> tuple[float, float]:
        """Displayed (width, height) in mm."""
        return grid.shape[self.col_axis] * self.col_spacing, grid.shape[self.row_axis] * self.row_spacing

    def letters(self) -> dict[str, str]:
        """Orientation letter at each edge of the panel (left, right, top, bottom)."""
        return {"left": _letter(-self.col_vec), "right": _letter(self.col_vec),
                "top": _letter(-self.row_vec), "bottom": _letter(self.row_vec)}

    def in_plane(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Screen (right, down) components in mm of RAS vectors [..., 3]."""
        return vectors @ self.col_vec, vectors @ self.row_vec


def _letter(vec: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(vec)))
    return "RAS"[axis] if vec[axis] > 0 else "LPI"[axis]


def slice_planes(grid: Grid) -> list[SlicePlane]:
    """Axial, coronal and sagittal planes through the centre of `grid`, oriented radiologically (module docstring)."""
    ornt = io_orientation(grid.affine)
    voxel_of = {int(ras): axis for axis, (ras, _) in enumerate(ornt)}
    direction, spacing = grid.direction, grid.spacing
    planes = []
    for name, normal_ras, (right, right_sign), (up, up_sign) in _PLANES:
        normal, col_axis, row_axis = voxel_of[normal_ras], voxel_of[right], voxel_of[up]
        col_flip = direction[right, col_axis] * right_sign < 0
        row_flip = direction[up, row_axis] * up_sign > 0  # index grows upwards: rows (downwards) run reversed
        size = grid.shape[normal]
        index = size // 2 if direction[normal_ras, normal] > 0 else (size - 1) // 2  # same anatomical slice both ways
        ijk = np.array([index if a == normal else (s - 1) / 2 for a, s in enumerate(grid.shape)])
        centre_along = float(grid.voxel_to_world(ijk)[normal_ras])
        side = ("RAS" if centre_along >= 0 else "LPI")[normal_ras]
        planes.append(SlicePlane(
            name, normal, index, row_axis, col_axis, bool(row_flip), bool(col_flip),
            direction[:, row_axis] * (-1.0 if row_flip else 1.0), direction[:, col_axis] * (-1.0 if col_flip else 1.0),
            float(spacing[row_axis]), float(spacing[col_axis]),
            f"{'ijk'[normal]} = {index}, {side} {abs(centre_along):.1f} mm"))
    return planes


def obliquity_degrees(grid: Grid) -> float:
    """Largest angle (degrees) between a voxel axis of `grid` and its nearest RAS axis."""
    cosines = np.abs(grid.direction).max(axis=0)
    return float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))


# ------------------------------------------------------------------------------------------------------ figures


def _window(data: np.ndarray) -> tuple[float, float]:
    """Display window (1st to 99.5th percentile of the non-zero voxels)."""
    values = data[np.isfinite(data)]
    nonzero = values[values != 0]
    values = nonzero if nonzero.size else values
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [1.0, 99.5])
    return float(low), float(high) if high > low else float(low) + 1.0


def _normalised(data: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    low, high = window
    return np.clip((data.astype(np.float64) - low) / (high - low), 0.0, 1.0)


def _figure(grid: Grid, planes: Sequence[SlicePlane], rows: int, title: str, *, colorbar: bool = False,
            title_lines: int = 1, legend_rows: int = 0) -> tuple[Figure, np.ndarray, Any]:
    """A figure of `rows` × 3 slice panels at one common mm scale, top-aligned.

    Returns the figure, its axes [rows, 3] and a colour-bar axis (None without `colorbar`). Laid out by hand
    (inches) rather than by matplotlib's constrained layout, which costs a second full draw.
    """
    sizes = [p.size_mm(grid) for p in planes]
    inch_per_mm = min(3.0 / max(h for _, h in sizes), 11.0 / sum(w for w, _ in sizes))
    widths = [w * inch_per_mm for w, _ in sizes]
    heights = [h * inch_per_mm for _, h in sizes]
    boxes = [max(w, MIN_PANEL_INCHES) for w in widths]  # narrow panels get room for their titles
    left, gap, top, title_h = 0.4, 0.12, 0.45, 0.12 + 0.17 * title_lines
    right = 1.5 if colorbar else 0.15
    bottom = 0.1 + 0.25 * legend_rows
    row_h = max(heights) + title_h + 0.1
    fig_w = left + sum(boxes) + gap * (len(planes) - 1) + right
    fig_h = top + rows * row_h + bottom
    fig = Figure(figsize=(fig_w, fig_h))
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=12, fontweight="bold", y=1 - 0.12 / fig_h, va="top")
    axes = np.empty((rows, len(planes)), dtype=object)
    for r in range(rows):
        y_top = fig_h - top - r * row_h - title_h
        x = left
        for c, (w, h, box) in enumerate(zip(widths, heights, boxes)):
            axes[r, c] = fig.add_axes(((x + (box - w) / 2) / fig_w, (y_top - h) / fig_h, w / fig_w, h / fig_h))
            x += box + gap
    cax = None
    if colorbar:
        span = rows * row_h - title_h
        cax = fig.add_axes(((fig_w - right + 0.25) / fig_w, (bottom + 0.1 * span) / fig_h, 0.2 / fig_w,
                            0.8 * span / fig_h))
    return fig, axes, cax


def _show(ax, plane: SlicePlane, image: np.ndarray, **kwargs):
    """Draw a displayed slice in screen mm; returns the AxesImage."""
    kwargs.setdefault("interpolation", "nearest")
    return ax.imshow(image, extent=plane.extent(image.shape), origin="upper", aspect="equal", **kwargs)


def _decorate(ax, plane: SlicePlane, title: str, ylabel: str | None = None) -> None:
    """Title, orientation letters at the four edges and a mm scale bar; no ticks."""
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=11, fontweight="bold")
    style = {"color": "white", "fontsize": 11, "fontweight": "bold", "transform": ax.transAxes,
             "bbox": {"boxstyle": "round,pad=0.15", "facecolor": "black", "alpha": 0.55, "linewidth": 0}}
    letters = plane.letters()
    ax.text(0.015, 0.5, letters["left"], ha="left", va="center", **style)
    ax.text(0.985, 0.5, letters["right"], ha="right", va="center", **style)
    ax.text(0.5, 0.985, letters["top"], ha="center", va="top", **style)
    ax.text(0.5, 0.015, letters["bottom"], ha="center", va="bottom", **style)
    left, right, bottom, top = ax.images[0].get_extent()
    width, height = right - left, bottom - top
    bar = max([b for b in (1, 2, 5, 10, 20, 50, 100, 200) if b <= width / 4] or [1])
    x1 = right - 0.04 * width
    y = bottom - 0.08 * height
    ax.plot([x1 - bar, x1], [y, y], color="white", linewidth=3, solid_capstyle="butt",
            path_effects=[withStroke(linewidth=5, foreground="black")])
    ax.text(x1 - bar / 2, y - 0.03 * height, f"{bar} mm", color="white", fontsize=8, ha="center", va="bottom",
            bbox={"boxstyle": "round,pad=0.1", "facecolor": "black", "alpha": 0.55, "linewidth": 0})


def _save(fig: Figure, folder: Path, name: str) -> str:
    fig.savefig(folder / name, dpi=_DPI, facecolor="white")
    return name


def _slices_figure(folder: Path, grid: Grid, planes: list[SlicePlane], volumes: dict[str, Image],
                   windows: dict[str, tuple[float, float]]) -> str:
    fig, axes, _ = _figure(grid, planes, len(volumes), "Fixed, moving (before) and warped (after) images")
    for r, (label, image) in enumerate(volumes.items()):
        for c, plane in enumerate(planes):
            _show(axes[r, c], plane, plane.take(image.data), cmap="gray", vmin=windows[label][0],
                  vmax=windows[label][1])
            _decorate(axes[r, c], plane, f"{plane.name} ({plane.position})", label if c == 0 else None)
    return _save(fig, folder, "slices.png")


def _checker(shape: tuple[int, int], plane: SlicePlane, tile_mm: float) -> np.ndarray:
    rows, cols = np.meshgrid(np.arange(shape[0]) * plane.row_spacing, np.arange(shape[1]) * plane.col_spacing,
                             indexing="ij")
    return ((np.floor(rows / tile_mm) + np.floor(cols / tile_mm)) % 2).astype(bool)


def _checkerboard_figure(folder: Path, grid: Grid, planes: list[SlicePlane], fixed: np.ndarray,
                         pairs: dict[str, np.ndarray]) -> str:
    """Checkerboards of the normalised fixed image (dark-framed tiles) with each image of `pairs`."""
    tile = max(p.size_mm(grid)[0] for p in planes) / 8
    fig, axes, _ = _figure(grid, planes, len(pairs), f"Checkerboard of fixed and moving tiles ({tile:.0f} mm tiles)")
    for r, (label, other) in enumerate(pairs.items()):
        for c, plane in enumerate(planes):
            f, o = plane.take(fixed), plane.take(other)
            _show(axes[r, c], plane, np.where(_checker(f.shape, plane, tile), o, f), cmap="gray", vmin=0, vmax=1)
            _decorate(axes[r, c], plane, f"{plane.name} ({plane.position})", label if c == 0 else None)
    return _save(fig, folder, "checkerboard.png")


def _difference_figure(folder: Path, grid: Grid, planes: list[SlicePlane], fixed: np.ndarray,
                       pairs: dict[str, np.ndarray]) -> str:
    """Fixed − other in normalised intensity, one symmetric colour scale for all rows."""
    diffs = {label: [p.take(fixed) - p.take(other) for p in planes] for label, other in pairs.items()}
    limit = max(float(np.percentile(np.abs(np.concatenate([d.ravel() for d in ds])), 99.5))
                for ds in diffs.values())
    limit = limit if limit > 0 else 1.0
    fig, axes, cax = _figure(grid, planes, len(pairs), "Difference fixed − moving (normalised intensity)",
                             colorbar=True)
    for r, (label, ds) in enumerate(diffs.items()):
        for c, (plane, d) in enumerate(zip(planes, ds)):
            im = _show(axes[r, c], plane, d, cmap="RdBu_r", vmin=-limit, vmax=limit)
            _decorate(axes[r, c], plane, f"{plane.name}: mean |difference| {np.abs(d).mean():.3f}",
                      label if c == 0 else None)
    bar = fig.colorbar(im, cax=cax, extend="both")
    bar.set_label("fixed − moving  (red: fixed brighter, blue: moving brighter)")
    return _save(fig, folder, "difference.png")


def _grid_lines(plane: SlicePlane, right: np.ndarray, down: np.ndarray, spacing_mm: float):
    """Deformed lines (x, y arrays in screen mm) of a regular grid of lines about `spacing_mm` apart."""
    rows, cols = right.shape
    y, x = np.meshgrid(np.arange(rows) * plane.row_spacing, np.arange(cols) * plane.col_spacing, indexing="ij")
    x, y = x + right, y + down
    for r in range(0, rows, max(1, round(spacing_mm / plane.row_spacing))):
        yield x[r], y[r]
    for c in range(0, cols, max(1, round(spacing_mm / plane.col_spacing))):
        yield x[:, c], y[:, c]


def _deformation_figure(folder: Path, grid: Grid, planes: list[SlicePlane], fixed: np.ndarray,
                        displacement: DisplacementField) -> str:
    fig, axes, _ = _figure(grid, planes, 1, "Deformation grid on the fixed image (in-plane displacement)",
                           title_lines=2)
    spacing_mm = max(max(p.size_mm(grid)) for p in planes) / 16
    for c, plane in enumerate(planes):
        ax = axes[0, c]
        _show(ax, plane, plane.take(fixed), cmap="gray", vmin=0, vmax=1)
        right, down = plane.in_plane(plane.take(displacement.data).astype(np.float64))
        for x, y in _grid_lines(plane, right, down, spacing_mm):
            ax.plot(x, y, color=_GRID_COLOUR, linewidth=0.7)
        left, right_edge, bottom, top = ax.images[0].get_extent()
        ax.set_xlim(left, right_edge)
        ax.set_ylim(bottom, top)
        magnitude = float(np.hypot(right, down).max())
        _decorate(ax, plane, f"{plane.name} ({plane.position})\nlargest in-plane shift {magnitude:.2f} mm")
    return _save(fig, folder, "deformation_grid.png")


def _contour(ax, plane: SlicePlane, image: np.ndarray, levels: Sequence[float], **kwargs) -> None:
    """Iso-lines of a displayed slice, in screen mm, keeping the panel's limits."""
    if image.min() < max(levels) and image.max() > min(levels):
        left, right, bottom, top = ax.images[0].get_extent()
        ax.contour(np.arange(image.shape[1]) * plane.col_spacing, np.arange(image.shape[0]) * plane.row_spacing,
                   image, levels=list(levels), **kwargs)
        ax.set_xlim(left, right)
        ax.set_ylim(bottom, top)


def _jacobian_figure(folder: Path, grid: Grid, planes: list[SlicePlane], det: np.ndarray,
                     fixed: np.ndarray) -> str:
    fig, axes, cax = _figure(grid, planes, 1, "Jacobian determinant (local volume ratio moving / fixed)",
                             colorbar=True, title_lines=2, legend_rows=1)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=2.0)
    folds = ListedColormap([_FOLD_COLOUR])
    for c, plane in enumerate(planes):
        ax = axes[0, c]
        d = plane.take(det)
        im = _show(ax, plane, d, cmap="RdBu_r", norm=norm)
        folded = d <= 0
        if folded.any():
            _show(ax, plane, np.ma.masked_where(~folded, np.ones_like(d)), cmap=folds, vmin=0, vmax=1)
        _contour(ax, plane, gaussian_filter(plane.take(fixed), 0.8), ANATOMY_LEVELS, colors="#303030",
                 linewidths=0.5, alpha=0.7)
        _decorate(ax, plane, f"{plane.name} ({plane.position})\n{int(folded.sum())} folded voxels in this slice")
    bar = fig.colorbar(im, cax=cax, extend="max")
    bar.set_label("det J   (1 = volume kept)")
    fig.legend(handles=[Patch(color=_FOLD_COLOUR, label="det J ≤ 0 (folding)")], loc="lower center", fontsize=9,
               frameon=False)
    return _save(fig, folder, "jacobian.png")


def _outline_figure(folder: Path, grid: Grid, planes: list[SlicePlane], fixed: np.ndarray, fixed_labels: np.ndarray,
                    warped_labels: np.ndarray, names: dict[int, str] | None) -> str:
    labels = [int(v) for v in np.union1d(np.unique(fixed_labels), np.unique(warped_labels)) if v]
    legend = len(labels) <= MAX_LEGEND_LABELS
    fig, axes, _ = _figure(grid, planes, 1, "Structure outlines: fixed (solid), warped moving (dashed)",
                           legend_rows=-(-len(labels) // 6) if legend else 0)
    colours = _label_colours(labels)
    for c, plane in enumerate(planes):
        ax = axes[0, c]
        _show(ax, plane, plane.take(fixed), cmap="gray", vmin=0, vmax=1)
        f, w = plane.take(fixed_labels), plane.take(warped_labels)
        for lab in labels:
            for mask, style in ((f == lab, "solid"), (w == lab, "dashed")):
                _contour(ax, plane, mask.astype(float), [0.5], colors=[colours[lab]], linewidths=1.0,
                         linestyles=style)
        _decorate(ax, plane, f"{plane.name} ({plane.position})")
    if legend:
        handles = [Line2D([], [], color=colours[lab], label=(names or {}).get(lab, f"label {lab}")) for lab in labels]
        fig.legend(handles=handles, loc="lower center", ncols=min(len(handles), 6), fontsize=8, frameon=False)
    return _save(fig, folder, "outlines.png")


def _label_colours(labels: list[int]) -> dict[int, tuple]:
    cmap = colormaps["tab10"] if len(labels) <= 10 else colormaps["tab20"]
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}


def _dice_figure(folder: Path, rows: list[tuple[str, float, float]]) -> str:
    """Horizontal bars of Dice before/after per structure, mean last."""
    height = 1.2 + 0.32 * len(rows)
    fig = Figure(figsize=(7.5, height), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    y = np.arange(len(rows))[::-1]
    before = [r[1] for r in rows]
    after = [r[2] for r in rows]
    ax.barh(y + 0.2, before, height=0.38, color="#a0a0a0", label="before (identity)")
    ax.barh(y - 0.2, after, height=0.38, color="#1f77b4", label="after registration")
    for yy, value in zip(y - 0.2, after):
        if np.isfinite(value):
            ax.text(min(value, 1.0) + 0.01, yy, f"{value:.3f}", va="center", fontsize=7)
    ax.set_yticks(y, [r[0] for r in rows], fontsize=8)
    ax.get_yticklabels()[-1].set_fontweight("bold")
    ax.axhline(0.5, color="#555555", linewidth=0.8)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("Dice overlap with the fixed segmentation (1 = perfect)")
    ax.set_title("Per-structure Dice before and after registration", fontweight="bold")
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, folder, "dice.png")


# --------------------------------------------------------------------------------------------------------- HTML


def _num(value: Any, digits: int = 3, unit: str = "") -> str:
    if value is None:
        return "—"
    value = float(value)
    if math.isnan(value):
        return "—"
    if math.isinf(value):
        return "∞"
    return f"{value:.{digits}f}{unit}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], css: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _label_name(label: str, names: dict[int, str] | None) -> str:
    name = (names or {}).get(int(label))
    return html.escape(name) if name else f"label {html.escape(label)}"


def _dice_section(labels: LabelMetrics, names: dict[int, str] | None) -> tuple[str, list[tuple[str, float, float]]]:
    before, after = labels.before, labels.after
    missing = StructureScores(float("nan"), float("nan"), float("nan"))
    rows, bars = [], []
    for key, b in before.per_label.items():
        a = after.per_label.get(key, missing)
        name = _label_name(key, names)
        bars.append((html.unescape(name), b.dice, a.dice))
        rows.append([html.escape(key), name, _num(b.dice), _num(a.dice), _signed(a.dice - b.dice),
                     _num(b.hd95, 2), _num(a.hd95, 2), _num(b.assd, 2), _num(a.assd, 2),
                     _num(labels.volume_change.get(key), 3)])
    rows.append(["", "<b>mean</b>", f"<b>{_num(before.mean_dice)}</b>", f"<b>{_num(after.mean_dice)}</b>",
                 f"<b>{_signed(after.mean_dice - before.mean_dice)}</b>", _num(before.mean_hd95, 2),
                 _num(after.mean_hd95, 2), _num(before.mean_assd, 2), _num(after.mean_assd, 2), ""])
    bars.append(("mean", before.mean_dice, after.mean_dice))
    header = ["Label", "Structure", "Dice before", "Dice after", "Δ Dice", "HD95 before (mm)", "HD95 after (mm)",
              "ASSD before (mm)", "ASSD after (mm)", "Volume ratio warped / moving"]
    return _table(header, rows, "dice"), bars


def _signed(value: float, digits: int = 3) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{value:+.{digits}f}"


def _tre_section(landmarks: LandmarkMetrics) -> str:
    rows = [[str(i + 1), _num(b, 2), _num(a, 2), _signed(a - b, 2)]
            for i, (b, a) in enumerate(zip(landmarks.before, landmarks.after))]
    mean_b, mean_a = landmarks.mean_before, landmarks.mean_after
    rows.append(["<b>mean</b>", f"<b>{_num(mean_b, 2)}</b>", f"<b>{_num(mean_a, 2)}</b>",
                 f"<b>{_signed(mean_a - mean_b, 2)}</b>"])
    return _table(["Landmark", "TRE before (mm)", "TRE after (mm)", "Change (mm)"], rows, "tre")


def _checks(metrics: Metrics, names: dict[int, str] | None) -> list[str]:
    """Plain-language warnings a reviewer should see first."""
    notes = []
    folding = metrics.jacobian.percent_nonpositive
    if folding > 0:
        notes.append(f"The transform folds (det J ≤ 0) in {folding:.3f} % of the voxels: "
                     "tissue there is not mapped one-to-one; inspect the Jacobian map.")
    labels = metrics.labels
    if labels and labels.after.mean_dice < labels.before.mean_dice:
        notes.append("Mean Dice is lower after registration than before.")
    if labels:
        dropped = [f"{_label_name(key, names)} ({b.dice:.3f} → {labels.after.per_label[key].dice:.3f})"
                   for key, b in labels.before.per_label.items()
                   if b.dice - labels.after.per_label[key].dice > DICE_DROP]
        if dropped:
            notes.append(f"Dice fell by more than {DICE_DROP} for: {', '.join(dropped)}.")
    marks = metrics.landmarks
    if marks and marks.mean_after > marks.mean_before:
        notes.append("Mean landmark error (TRE) is larger after registration than before.")
    if metrics.similarity_after.ncc < metrics.similarity_before.ncc:
        notes.append("Image similarity (NCC) is lower after registration than before.")
    return notes


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.5em auto; max-width: 1250px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ccc; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #bbb; padding: 3px 8px; text-align: right; }
th { background: #eef1f5; } td:first-child, th:first-child { text-align: left; }
table.kv td:first-child { font-weight: 600; background: #f7f7f7; }
table.dice td:nth-child(2) { text-align: left; }
.ok { background: #e8f5e9; border-left: 5px solid #43a047; padding: 0.5em 1em; }
.warn { background: #fff4e5; border-left: 5px solid #fb8c00; padding: 0.5em 1em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.92em; color: #444; max-width: 1100px; }
.note { font-size: 0.9em; color: #555; } code { font-size: 0.9em; word-break: break-all; }
"""


_CAPTIONS = {
    "slices": "Fixed image, moving image before registration (resampled on the fixed grid without deformation) "
              "and after registration (warped), through the centre of the fixed image. Grey-scale window: 1st "
              "to 99.5th percentile of the non-zero voxels of each image (moving and warped share one).",
    "outlines": "Fixed segmentation (solid) and warped moving segmentation (dashed), one colour per structure; "
                "after a good registration the outlines coincide.",
    "checkerboard": "Checkerboards alternating fixed-image tiles with moving tiles, before and after "
                    "registration: structure edges should run continuously across tile borders after it, and "
                    "the tiles become invisible where the images match.",
    "difference": "Fixed minus moving intensity (each image scaled by its display window) before and after "
                  "registration, same colour scale in both rows; less colour means better agreement.",
    "deformation_grid": "A regular grid on the fixed image deformed by the in-plane components of the "
                        "displacement (point p drawn at p + d(p), where it samples the moving image).",
    "jacobian": "Jacobian determinant det J of the transform, the local volume ratio moving / fixed: blue "
                "(det J < 1) where the matching region of the moving image is smaller than in the fixed image, "
                "red (det J > 1) where it is larger, white where volume is kept; green marks folding "
                "(det J ≤ 0), which is anatomically impossible. Thin grey lines: fixed-image outlines for "
                "orientation.",
}
"""Figure captions of the HTML page, plain text."""


def _figure_html(name: str, caption: str) -> str:
    caption = html.escape(caption)
    return f'<figure><img src="{html.escape(name)}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'


def _summary_rows(result: RegistrationResult, fixed: Image, moving: Image) -> list[list[str]]:
    run = result.metrics.run
    rows = [["Method", html.escape(result.method)],
            ["Model sha256", f"<code>{html.escape(result.model_sha256 or '—')}</code>"],
            ["Device", html.escape(result.device)],
            ["Fixed image", f"{html.escape(fixed.source)} — {fixed.grid.shape}, spacing "
                            f"{', '.join(f'{s:.2f}' for s in fixed.grid.spacing)} mm"],
            ["Moving image", f"{html.escape(moving.source)} — {moving.grid.shape}, spacing "
                             f"{', '.join(f'{s:.2f}' for s in moving.grid.spacing)} mm"]]
    rows.append(["Working grid", f"{tuple(run.working_shape)} voxels of {run.working_spacing_mm:.2f} mm"])
    for label, value in (("Pre-alignment", run.options.prealign),
                         ("Instance optimisation steps", run.options.instance_optimization),
                         ("Seed", run.options.seed), ("Peak memory (MB)", run.peak_memory_mb),
                         ("Peak GPU memory (MB)", run.peak_gpu_memory_mb)):
        if value is not None:
            rows.append([label, html.escape(str(value))])
    return rows


def _quality_rows(m: Metrics) -> list[list[str]]:
    """Regularity, similarity, overlap and landmark measures of `metrics`, as table rows."""
    jac = m.jacobian
    rows = [["Folding: voxels with det J ≤ 0", _num(jac.percent_nonpositive, 4, " %")]]
    if m.jacobian_in_labels is not None:
        rows.append(["Folding inside the fixed segmentation",
                     _num(m.jacobian_in_labels.percent_nonpositive, 4, " %")])
    rows += [["SDlogJ (std of log det J; 0 = volume-preserving)", _num(jac.sdlogj, 4)],
             ["SDlogJ, Learn2Reg definition", _num(jac.sdlogj_learn2reg, 4)],
             ["det J minimum / maximum", f"{_num(jac.min)} / {_num(jac.max)}"],
             ["NCC before → after (1 = identical)", _before_after(m.similarity_before.ncc, m.similarity_after.ncc)],
             ["Mutual information before → after", _before_after(m.similarity_before.mi, m.similarity_after.mi)]]
    if m.labels:
        rows.append(["Mean Dice before → after", _before_after(m.labels.before.mean_dice, m.labels.after.mean_dice)])
    if m.landmarks:
        rows.append(["Mean TRE before → after",
                     _before_after(m.landmarks.mean_before, m.landmarks.mean_after, 2) + " mm"])
    return rows


def _before_after(before: float, after: float, digits: int = 3) -> str:
    return f"{_num(before, digits)} → {_num(after, digits)}"


def _html(result: RegistrationResult, fixed: Image, moving: Image, figures: dict[str, str], dice_table: str | None,
          label_names: dict[int, str] | None, oblique: float) -> str:
    m = result.metrics
    parts = [f"<h1>Registration QA report — {html.escape(result.method)}</h1>",
             f'<p class="note">Moving image <b>{html.escape(moving.source)}</b> registered to fixed image '
             f"<b>{html.escape(fixed.source)}</b>. Generated {datetime.datetime.now().isoformat(timespec='seconds')}"
             ". All distances in mm; all images shown on the fixed image grid.</p>"]
    notes = _checks(m, label_names)
    if notes:
        parts.append('<div class="warn"><b>Check:</b><ul>' + "".join(f"<li>{n}</li>" for n in notes) + "</ul></div>")
    else:
        parts.append('<div class="ok">No folding, and no quality measure got worse with registration.</div>')

    parts.append("<h2>Summary</h2>")
    parts.append(_table(["Quality measure", "Value"], _quality_rows(m), "kv"))
    parts.append(_table(["Run", ""], _summary_rows(result, fixed, moving), "kv"))
    times = m.run.time_s if m.run is not None else None
    if times:
        parts.append(_table(["Stage", "Time (s)"],
                            [[html.escape(k) if k != "total" else "<b>total</b>", _num(v, 2)]
                             for k, v in times.items()], "time"))

    marks = m.landmarks
    if dice_table is not None:
        parts.append("<h2>Structure overlap (Dice)</h2>")
        parts.append('<p class="note">Before: moving segmentation resampled on the fixed grid without deformation. '
                     "HD95: 95th-percentile Hausdorff distance; ASSD: average symmetric surface distance. Volume ratio:"
                     " volume of the warped structure over its volume in the moving image (1 = unchanged).</p>")
        parts.append(dice_table)
        if "dice" in figures:
            parts.append(_figure_html(figures["dice"], "Per-structure Dice before (grey) and after (blue) "
                                      "registration; the last row is the mean."))
    if marks:
        parts.append("<h2>Landmarks (target registration error)</h2>")
        parts.append('<p class="note">TRE: distance in mm between the moving landmark and its fixed landmark mapped '
                     "through the transform (before: without transform).</p>")
        parts.append(_tre_section(marks))

    parts.append("<h2>Images</h2>")
    orientation = CONVENTION
    if oblique > 1.0:
        orientation += (f" The fixed grid is oblique (up to {oblique:.1f}° from the patient axes): panels show the "
                        "native voxel planes nearest to each anatomical plane and the letters the nearest direction.")
    parts.append(f'<p class="note">{orientation}</p>')
    for key in _CAPTIONS:
        if key in figures:
            parts.append(_figure_html(figures[key], _CAPTIONS[key]))
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Registration QA — {html.escape(result.method)}</title><style>{_CSS}</style></head>"
            f"<body>\n{body}\n</body></html>\n")


# ---------------------------------------------------------------------------------------------------------- API


def write_report(out_dir: Path, fixed: Image, moving: Image, result: RegistrationResult,
                 fixed_labels: Image | None = None, label_names: dict[int, str] | None = None) -> Path:
    """Write `report.html` and its PNG figures into `out_dir`; returns the path of `report.html`.

    `fixed_labels` (on the fixed grid) with `result.warped_labels` adds the structure-outline figure; Dice and TRE
    tables come from `result.metrics` (engine.evaluate). `label_names` maps label values to structure names.
    Everything is written into a temporary folder inside `out_dir` first and moved into place, `report.html` last,
    so a failure never leaves a half-written report.
    """
    grid = fixed.grid
    if fixed_labels is not None and not fixed_labels.grid.same_as(grid, tol=1e-3):
        raise InputError(f"{fixed_labels.source}: label map grid differs from the fixed image {fixed.source}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    planes = slice_planes(grid)
    identity = DisplacementField(np.zeros((*grid.shape, 3), dtype=np.float32), grid)
    before = apply_field(moving, identity)
    fixed_window, moving_window = _window(fixed.data), _window(moving.data)
    fixed_n = _normalised(fixed.data, fixed_window)
    before_n, warped_n = _normalised(before.data, moving_window), _normalised(result.warped.data, moving_window)

    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=out_dir))
    try:
        figures = {
            "slices": _slices_figure(tmp, grid, planes, {"Fixed": fixed, "Moving (before)": before,
                                                         "Warped (after)": result.warped},
                                     {"Fixed": fixed_window, "Moving (before)": moving_window,
                                      "Warped (after)": moving_window}),
            "checkerboard": _checkerboard_figure(tmp, grid, planes, fixed_n, {"Before": before_n,
                                                                              "After": warped_n}),
            "difference": _difference_figure(tmp, grid, planes, fixed_n, {"Before": before_n, "After": warped_n}),
            "deformation_grid": _deformation_figure(tmp, grid, planes, fixed_n, result.field),
            "jacobian": _jacobian_figure(tmp, grid, planes, result.jacobian.data, fixed_n),
        }
        if fixed_labels is not None and result.warped_labels is not None:
            figures["outlines"] = _outline_figure(tmp, grid, planes, fixed_n, fixed_labels.data,
                                                  result.warped_labels.data, label_names)
        dice_table = None
        if result.metrics.labels is not None:
            dice_table, bars = _dice_section(result.metrics.labels, label_names)
            figures["dice"] = _dice_figure(tmp, bars)
        text = _html(result, fixed, moving, figures, dice_table, label_names, obliquity_degrees(grid))
        (tmp / "report.html").write_text(text, encoding="utf-8")
        for name in figures.values():
            os.replace(tmp / name, out_dir / name)
        os.replace(tmp / "report.html", out_dir / "report.html")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / "report.html"
