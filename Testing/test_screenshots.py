"""The screenshots in docs/screenshots (README, extension metadata) are what the module produces on the sample pair:
`scripts/screenshots.py` regenerates them here, offscreen, and each must show what its caption says."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import vtk
from vtk.util import numpy_support

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import screenshots  # noqa: E402


def read_png(path: Path) -> np.ndarray:
    reader = vtk.vtkPNGReader()
    reader.SetFileName(str(path))
    reader.Update()
    image = reader.GetOutput()
    width, height, _ = image.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
    return pixels[::-1, :, :3].astype(np.int32)


def count(pixels: np.ndarray, condition) -> int:
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return int(condition(r, g, b).sum())


def test_screenshots_regenerate_from_the_sample_pair_and_show_what_they_say(tmp_path):
    written = screenshots.generate(tmp_path / "shots", folder=tmp_path / "work")
    assert set(written) == set(screenshots.SHOTS)
    images = {name: read_png(path) for name, path in written.items()}
    for name, pixels in images.items():
        colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
        assert pixels.std() > 10 and colours > 50, (name, pixels.std(), colours)
    # the views: anatomy over a black background; each overlay in its colour
    assert count(images["warped-over-fixed.png"], lambda r, g, b: (r > 120) & (abs(r - b) < 10)) > 20_000
    jacobian = images["jacobian.png"]
    body, legend = jacobian[:, :-50], jacobian[:, -40:]
    assert count(body, lambda r, g, b: r - b > 30) > 1000, "reddish: local growth"
    assert count(body, lambda r, g, b: b - r > 30) > 1000, "bluish: local shrinking"
    assert count(legend, lambda r, g, b: (r > 150) & (b < 120)) > 200, "the legend's red end"
    assert count(legend, lambda r, g, b: (b > 150) & (r < 140)) > 200, "the legend's blue end"
    assert count(images["folding.png"], lambda r, g, b: (r > 200) & (g > 180) & (b < 90)) > 100, "yellow outline"
    assert count(images["grid.png"], lambda r, g, b: (g > 150) & (r < 120) & (b < 120)) > 1000, "green grid"
    halves = {}
    for name in ("checkerboard.png", "difference.png"):  # before registration (left), after (right)
        pixels = images[name]
        half = (pixels.shape[1] - 6) // 2
        halves[name] = pixels[:, :half], pixels[:, -half:]
        assert np.abs(halves[name][0] - halves[name][1]).mean() > 1.0, name
    before, after = halves["difference.png"]
    assert after.mean() < before.mean(), "less is left over in the difference after registration"


def test_committed_screenshots_are_in_the_readme_and_the_extension_metadata():
    readme = (ROOT / "README.md").read_text()
    cmake = (ROOT / "CMakeLists.txt").read_text()
    urls = re.search(r'set\(EXTENSION_SCREENSHOTURLS "([^"]*)"\)', cmake).group(1).split()
    for name in screenshots.SHOTS:
        path = ROOT / "docs" / "screenshots" / name
        assert path.is_file() and read_png(path).std() > 10, name
        assert f"docs/screenshots/{name}" in readme, name
    assert urls and all(url.startswith("https://raw.githubusercontent.com/") for url in urls)
    assert {url.rsplit("/", 1)[1] for url in urls} <= set(screenshots.SHOTS)
    assert (ROOT / "DeepRegistration" / "Resources" / "Icons" / "DeepRegistrationSampleData.png").is_file()
