"""Screenshots of what the Slicer module produces on the bundled sample pair, rendered offscreen.

    python scripts/screenshots.py [OUT_DIR]        (default: docs/screenshots; the README and CMakeLists.txt use them)

The module runs in the pytest harness of Testing/slicer_harness (slicer-core's MRML scene, Slicer's own slice logics
and displayable managers in an offscreen VTK render window): the sample pair is loaded through the Sample Data module,
registered through the panel with the shipped LapIRN model (segmentations, landmarks, the transform shown as a grid),
then once more with an untrained network alone (preset fast), whose folding shows what the folding outline looks like. Each view is one
click of the panel (overlay, checkerboard, difference) or the output volumes themselves; the tables are drawn from the
table nodes. `Testing/test_screenshots.py` regenerates them and checks they are not blank.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT / "Testing", ROOT / "DeepRegistration", ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

SHOTS = {
    "warped-over-fixed.png": "the warped moving volume at 50 % over the fixed one (the Overlay button), axial",
    "checkerboard.png": "checkerboard of fixed and moving before registration (left) and fixed and warped after (right)",
    "difference.png": "fixed minus moving before (left) and fixed minus warped after registration (right)",
    "grid.png": "the grid transform shown as a deformed grid over the fixed volume, coronal",
    "jacobian.png": "det J with its colour legend (window 0.8–1.2), axial",
    "folding.png": "folding (det J ≤ 0) outlined in yellow over det J, from an untrained network, axial",
    "tables.png": "comparison, segment and landmark tables",
}
"""File → what it shows, in the order of the README."""
THUMBNAIL = ROOT / "DeepRegistration" / "Resources" / "Icons" / "DeepRegistrationSampleData.png"


def _untrained_folding_model(folder: Path) -> str:
    """A tiny untrained LapIRN with random velocity heads and no integration: its field folds in about 2 % of the
    voxels of the sample pair, which shows what the folding outline looks like."""
    import torch

    from DeepRegistrationLib.methods import models, registry

    torch.manual_seed(7)
    spec = registry.get_method("lapirn")
    net = spec.build(spec.config_class(start_channels=4, num_res_blocks=1, working_spacing=4.0, int_steps=0))
    for level in net.levels:
        torch.nn.init.normal_(level.head.out.weight, std=0.5)
    return str(models.save_model(net, "lapirn", folder / "untrained_lapirn.safetensors"))


def _draw_tables(tables: list[tuple[str, object, int]], path: Path) -> None:
    """(title, table node, how many last rows; 0: all) as one figure (matplotlib), numbers to three digits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from DeepRegistrationLib.frontends.mrml import table_values

    blocks = []
    for title, node, last in tables:
        rows = table_values(node)[-last:] if last else table_values(node)
        if not rows:
            continue
        header = [name for name in rows[0] if name not in ("Run", "Moving", "Fixed")]
        cells = [[(f"{row[n]:.3g}" if isinstance(row[n], float) else str(row[n])) for n in header] for row in rows]
        blocks.append((title, header, cells))
    heights = [len(cells) + 2 for _, _, cells in blocks]
    figure, axes = plt.subplots(len(blocks), 1, figsize=(7.2, 0.26 * sum(heights) + 0.6),
                                gridspec_kw={"height_ratios": heights})
    for ax, (title, header, cells) in zip(np.atleast_1d(axes), blocks):
        ax.axis("off")
        ax.set_title(title, loc="left", fontsize=10, fontweight="bold")
        table = ax.table(cellText=cells, colLabels=header, loc="upper left", cellLoc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(7)
        table.auto_set_column_width(col=list(range(len(header))))
        table.scale(1.0, 1.15)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def apply(harness, widget, what: str):
    """Click Apply, wait for the run, and return its RegistrationNodes with the residual lines hidden."""
    widget.ui.applyButton.click()
    harness.processEvents()
    if not widget.ui.statusLabel.text.startswith("Done"):
        raise RuntimeError(f"{what} did not finish: {widget.ui.statusLabel.text}")
    nodes = widget._lastNodes
    for line in nodes.residuals:
        line.GetDisplayNode().SetVisibility(False)
    return nodes


def generate(out_dir: Path, folder: Path | None = None, size: tuple[int, int] = (400, 400)) -> dict[str, Path]:
    """Render every screenshot of `SHOTS` into `out_dir` (and the Sample Data thumbnail when `out_dir` is
    docs/screenshots); returns file name → path."""
    import slicer

    from DeepRegistrationLib.frontends.mrml import show_comparison
    from slicer_harness import SlicerHarness
    from slicer_harness.app import SliceView, write_png

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(folder or tempfile.mkdtemp(prefix="DeepRegistration-screenshots-"))
    written: dict[str, Path] = {}
    with SlicerHarness(folder) as harness:
        app = harness.application
        views = {name: SliceView(app, name, size) for name in ("Red", "Green")}  # Slicer's views exist from the start
        widget = harness.openModule()
        ui = widget.ui
        import SampleData

        fixed, moving, fixedTissues, movingTissues, fixedPoints, movingPoints = \
            SampleData.SampleDataLogic().downloadSamples("DeepRegistrationBrainPair")
        for node in (fixedTissues, movingTissues, fixedPoints, movingPoints):
            node.GetDisplayNode().SetVisibility(False)
        ui.fixedVolumeSelector.setCurrentNode(fixed)
        ui.movingVolumeSelector.setCurrentNode(moving)
        ui.fixedSegmentationSelector.setCurrentNode(fixedTissues)
        ui.movingSegmentationSelector.setCurrentNode(movingTissues)
        ui.fixedLandmarksSelector.setCurrentNode(fixedPoints)
        ui.movingLandmarksSelector.setCurrentNode(movingPoints)
        ui.transformDisplayComboBox.setCurrentIndex(ui.transformDisplayComboBox.findData("grid"))
        shipped = apply(harness, widget, "the registration")
        for view in views.values():
            view.fit()
            view.setOffsetFraction(0.55)

        def layers(background, foreground=None, opacity=0.0) -> None:
            for name in views:
                composite = app.compositeNode(name)
                composite.SetBackgroundVolumeID(background.GetID())
                composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
                composite.SetForegroundOpacity(opacity)
                composite.SetCompositing(composite.Alpha)
            # the offscreen views' colour-legend manager updates on a legend node's change, not on a layer change
            legends = slicer.mrmlScene.GetNodesByClass("vtkMRMLColorLegendDisplayNode")
            for i in range(legends.GetNumberOfItems()):
                legends.GetItemAsObject(i).Modified()

        def save(name: str, *images: np.ndarray) -> None:
            written[name] = out_dir / name
            gap = np.full((images[0].shape[0], 6, 3), 255, np.uint8)
            write_png(np.concatenate([part for image in images for part in (image, gap)][:-1], axis=1),
                      written[name])

        shipped.transform.GetDisplayNode().SetVisibility(False)
        ui.overlayButton.click()
        save("warped-over-fixed.png", views["Red"].image())
        show_comparison(fixed, moving, "checkerboard")  # what the Checkerboard button shows, before registration
        before = views["Red"].image()
        ui.checkerboardButton.click()
        save("checkerboard.png", before, views["Red"].image())
        show_comparison(fixed, moving, "difference")
        before = views["Red"].image()
        ui.differenceButton.click()
        save("difference.png", before, views["Red"].image())
        layers(fixed)
        shipped.transform.GetDisplayNode().SetVisibility(True)
        save("grid.png", views["Green"].image())
        shipped.transform.GetDisplayNode().SetVisibility(False)
        shipped.jacobian.GetDisplayNode().SetWindowLevelMinMax(0.8, 1.2)
        layers(shipped.jacobian)
        save("jacobian.png", views["Red"].image())

        # an untrained network alone (preset fast: the refinement would unfold it): what the folding outline shows
        ui.transformDisplayComboBox.setCurrentIndex(ui.transformDisplayComboBox.findData("none"))
        ui.presetComboBox.setCurrentIndex(ui.presetComboBox.findText("fast"))
        ui.weightsLineEdit.text = _untrained_folding_model(folder)
        ui.weightsLineEdit.finishEditing()
        untrained = apply(harness, widget, "the second registration")
        layers(untrained.jacobian)
        save("folding.png", views["Red"].image())

        written["tables.png"] = out_dir / "tables.png"
        _draw_tables([("Comparison of the runs (one row per Apply)", untrained.comparison, 0),
                      ("Segment metrics, shipped LapIRN", shipped.segmentTable, 0),
                      ("Landmark TRE (mm) over the 30 landmarks, shipped LapIRN", shipped.landmarkTable, 4)],
                     written["tables.png"])
        if out_dir.resolve() == (ROOT / "docs" / "screenshots").resolve():
            for node in (shipped.folding, untrained.folding):
                node.GetDisplayNode().SetVisibility(False)
            small = SliceView(app, "Yellow", (128, 128))
            composite = app.compositeNode("Yellow")
            composite.SetBackgroundVolumeID(fixed.GetID())
            composite.SetForegroundVolumeID(None)
            small.fit()
            small.setOffsetFraction(0.5)
            write_png(small.image(), THUMBNAIL)
            small.close()
        for view in views.values():
            view.close()
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "screenshots"
    for name, path in generate(target).items():
        print(f"{path}: {SHOTS[name]}")
