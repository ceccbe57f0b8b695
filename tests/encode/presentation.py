"""Presentation states as DCMTK sees them: dcmp2pgm renders the image under the GSPS and dumps its graphics.

dcmp2pgm applies a presentation state's Modality LUT, VOI window and displayed area, but (its manual says so) does
not draw graphic or text annotations: those are its viewer's job. So the tests take both halves from DCMTK: the
rendered bitmap, and the graphic objects as DCMTK read them for that image (``dcmp2pgm -v`` prints them), and
draw those onto the bitmap themselves where a picture is wanted.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.spatial import cKDTree

from conftest import require_tool

_LAYER = re.compile(r"^I: Graphic Layer #\d+ \[(?P<name>[^\]]*)\]")
_GRAPHIC = re.compile(r"^I:\s+graphic \d+: points=(?P<n>\d+) type=(?P<type>\w+)")
_COORDINATES = re.compile(r"^I:\s+coordinates: (?P<values>.*)$")
_TEXT = re.compile(r'^I:\s+text \d+: "(?P<text>.*)"$')


@dataclass
class Layer:
    """What DCMTK read of one graphic layer for one image: polylines (``[n, 2]`` column, row) and texts."""

    name: str
    graphics: list[tuple[str, np.ndarray]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def polylines(self) -> list[np.ndarray]:
        return [points for kind, points in self.graphics if kind == "polyline"]


@dataclass
class Rendering:
    """dcmp2pgm's bitmap of an image under a presentation state, and the graphics it read for that image."""

    bitmap: np.ndarray
    layers: dict[str, Layer]
    log: str


def _points(values: str) -> np.ndarray:
    pairs = [pair.strip().split("\\") for pair in values.strip().rstrip(",").split(",") if pair.strip()]
    return np.array([(float(x), float(y)) for x, y in pairs], dtype=np.float64)


def _parse(log: str) -> dict[str, Layer]:
    layers: dict[str, Layer] = {}
    layer: Layer | None = None
    kind = ""
    for line in log.splitlines():
        if match := _LAYER.match(line):
            layer = layers.setdefault(match["name"], Layer(match["name"]))
        elif (match := _GRAPHIC.match(line)) and layer is not None:
            kind = match["type"]
        elif (match := _COORDINATES.match(line)) and layer is not None:
            layer.graphics.append((kind, _points(match["values"])))
        elif (match := _TEXT.match(line)) and layer is not None:
            layer.texts.append(match["text"])
    return layers


def render(pstate: Path, image: Path, out: Path, frame: int = 1) -> Rendering:
    """Run ``dcmp2pgm -v -p pstate image out.pgm``; the bitmap and the graphics DCMTK read for that image."""
    tool = require_tool("dcmp2pgm")
    run = subprocess.run(
        [tool, "-v", "-f", str(frame), "-p", str(pstate), str(image), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    log = run.stdout + run.stderr
    assert not [line for line in log.splitlines() if line.startswith(("E:", "F:"))], log
    bitmap = np.asarray(Image.open(out), dtype=np.uint8)
    return Rendering(bitmap, _parse(log), log)


def off_boundary(points: np.ndarray, mask: np.ndarray) -> float:
    """How far (pixels) the worst point of an outline is from the boundary of ``mask``.

    A point lies on the boundary when both an inside and an outside pixel centre are near it; the result is the
    larger of the two distances, at the worst point (``0.5`` for a point half-way between two pixel centres).
    """
    centres_in = np.argwhere(mask)[:, ::-1] + 0.5  # (column, row) image coordinates of pixel centres
    centres_out = np.argwhere(~mask)[:, ::-1] + 0.5
    inside, _ = cKDTree(centres_in).query(points)
    outside, _ = cKDTree(centres_out).query(points)
    return float(np.max(np.maximum(inside, outside)))


def overlay(rendering: Rendering, colours: dict[str, tuple[int, int, int]], scale: int = 1) -> Image.Image:
    """The bitmap with DCMTK's graphics drawn on (for pictures a person looks at)."""
    image = Image.fromarray(rendering.bitmap, mode="L").convert("RGB")
    if scale > 1:
        image = image.resize((image.size[0] * scale, image.size[1] * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    for name, layer in rendering.layers.items():
        for _, points in layer.graphics:
            draw.line([(x * scale - 0.5, y * scale - 0.5) for x, y in points], fill=colours.get(name, (255, 0, 0)))
    return image
