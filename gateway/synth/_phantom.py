"""Analytic thorax phantom with spherical lung nodules (the pixel model behind :mod:`gateway.synth.ct`).

Coordinates are DICOM patient coordinates (LPS, mm). The voxel grid is described by
:class:`VolumeGeometry`; see :mod:`gateway.synth.ct` for the full geometry convention. All shapes are
analytic (ellipses, elliptic cylinders and ellipsoids), so a slice, or any scattered set of points,
can be labelled on its own without materialising a 3-D volume.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "Nodule",
    "SliceRenderer",
    "Tissue",
    "VolumeGeometry",
    "nodule_mask",
    "phantom_hu",
    "rng_streams",
    "tissue_labels",
]

FloatArray = npt.NDArray[np.float64]
Vec3 = tuple[float, float, float]


class Tissue(IntEnum):
    """Tissue label of a phantom point, as returned by :func:`tissue_labels`."""

    AIR = 0
    FAT = 1
    SOFT = 2  # muscle / soft tissue
    LUNG = 3
    HEART = 4
    AORTA = 5
    BONE = 6
    CSF = 7  # spinal canal


# Mean HU and noise sigma (HU) per tissue label.
_HU_LUT: Final = np.array([-1000, -100, 40, -850, 40, 45, 700, 15], dtype=np.float32)
_SIGMA_LUT: Final = np.array([10, 10, 10, 22, 10, 10, 10, 10], dtype=np.float32)
_NODULE_SIGMA: Final = 10.0
_INF: Final = math.inf

# Anatomy: (centre xyz, semi-axes xyz) in mm; an infinite z axis makes an elliptic cylinder.
_BODY: Final = ((0.0, 0.0, 0.0), (170.0, 120.0, _INF))
_BODY_INNER: Final = ((0.0, 0.0, 0.0), (158.0, 108.0, _INF))  # inside the subcutaneous fat ring
_LUNGS: Final = (((-72.0, 0.0, -20.0), (52.0, 80.0, 170.0)), ((72.0, 0.0, -20.0), (52.0, 80.0, 170.0)))
_HEART: Final = ((18.0, -30.0, -50.0), (58.0, 48.0, 75.0))
_AORTA: Final = ((22.0, 48.0, 0.0), (12.0, 12.0, _INF))
_VERTEBRA: Final = ((0.0, 70.0, 0.0), (17.0, 17.0, _INF))
_ARCH: Final = ((0.0, 94.0, 0.0), (12.0, 12.0, _INF))
_CANAL: Final = ((0.0, 94.0, 0.0), (7.0, 7.0, _INF))
_STERNUM: Final = ((0.0, -100.0, 0.0), (12.0, 6.0, _INF))
_RIB_ANGLES_DEG: Final = (-65.0, -40.0, -15.0, 10.0, 35.0, 60.0)
_RIB_RING: Final = (150.0, 100.0)
_RIB_RADIUS: Final = 5.0
_RIB_PERIOD_MM: Final = 36.0


@dataclass(frozen=True)
class Nodule:
    """A spherical lung nodule, the segmentation truth of the phantom.

    Attributes
    ----------
    center_mm : tuple of float
        Centre in patient coordinates (LPS), millimetres.
    radius_mm : float
        Sphere radius in millimetres.
    hu : float
        Mean attenuation of the nodule in Hounsfield units.
    """

    center_mm: Vec3
    radius_mm: float
    hu: float

    @property
    def volume_ml(self) -> float:
        """Sphere volume in millilitres (``4/3 pi r^3 / 1000``)."""
        return 4.0 / 3.0 * math.pi * self.radius_mm**3 / 1000.0


@dataclass(frozen=True)
class VolumeGeometry:
    """Voxel grid of a series, following the module's geometry convention.

    Attributes
    ----------
    shape : tuple of int
        ``(slices, rows, columns)``.
    pixel_spacing : tuple of float
        ``(row spacing, column spacing)`` in mm.
    slice_spacing : float
        Distance between adjacent slice centres in mm.
    """

    shape: tuple[int, int, int]
    pixel_spacing: tuple[float, float]
    slice_spacing: float

    def x_mm(self) -> FloatArray:
        """Return the x coordinate of each column centre, shape ``(columns,)``."""
        n = self.shape[2]
        return (np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * self.pixel_spacing[1]

    def y_mm(self) -> FloatArray:
        """Return the y coordinate of each row centre, shape ``(rows,)``."""
        n = self.shape[1]
        return (np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * self.pixel_spacing[0]

    def z_mm(self, k: int) -> float:
        """Return the z coordinate of slice ``k`` (0-based; z decreases with ``k``)."""
        return ((self.shape[0] - 1) / 2.0 - k) * self.slice_spacing

    def image_position(self, k: int) -> Vec3:
        """Return ``ImagePositionPatient`` (centre of the first pixel) of slice ``k``."""
        return (float(self.x_mm()[0]), float(self.y_mm()[0]), self.z_mm(k))


def rng_streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Return the independent ``(placement, noise)`` generators used for ``seed``.

    Parameters
    ----------
    seed : int
        Non-negative seed.

    Returns
    -------
    tuple of numpy.random.Generator
        Generator for nodule placement, then the generator consumed slice by slice for noise.
    """
    placement, noise = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(placement), np.random.default_rng(noise)


def _ellipsoid(x: npt.ArrayLike, y: npt.ArrayLike, z: npt.ArrayLike, shape: tuple[Vec3, Vec3]) -> npt.NDArray[np.bool_]:
    (cx, cy, cz), (a, b, c) = shape
    zz = np.square((np.asarray(z) - cz) / c)
    return np.asarray((np.square((np.asarray(x) - cx) / a) + zz) + np.square((np.asarray(y) - cy) / b) <= 1.0)


def _rib_shapes() -> tuple[tuple[Vec3, Vec3], ...]:
    ribs = []
    for deg in _RIB_ANGLES_DEG:
        rx, ry = _RIB_RING[0] * math.cos(math.radians(deg)), _RIB_RING[1] * math.sin(math.radians(deg))
        for side in (-1.0, 1.0):
            ribs.append(((side * rx, ry, 0.0), (_RIB_RADIUS, _RIB_RADIUS, _INF)))
    return tuple(ribs)


_RIBS: Final = _rib_shapes()
_Layers = tuple[tuple[tuple[Vec3, Vec3], int], ...]
_BASE_LAYERS: Final[_Layers] = ((_BODY, Tissue.FAT), (_BODY_INNER, Tissue.SOFT))
_Z_LAYERS: Final[_Layers] = (*((lung, Tissue.LUNG) for lung in _LUNGS), (_HEART, Tissue.HEART))
_OVERLAY_LAYERS: Final[_Layers] = (
    (_AORTA, Tissue.AORTA),
    (_STERNUM, Tissue.BONE),
    (_VERTEBRA, Tissue.BONE),
    (_ARCH, Tissue.BONE),
    (_CANAL, Tissue.CSF),
)


def tissue_labels(x: npt.ArrayLike, y: npt.ArrayLike, z: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """Label the phantom's tissue (without nodules) at points given in patient mm.

    Parameters
    ----------
    x, y, z : array_like
        Coordinates, broadcast together (e.g. a ``(1, columns)`` x row, a ``(rows, 1)`` y column and
        a scalar z for one slice, or three 1-D arrays for scattered points).

    Returns
    -------
    numpy.ndarray of uint8
        A :class:`Tissue` value per broadcast point.
    """
    z_arr = np.asarray(z, dtype=np.float64)
    labels = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y), z_arr.shape), dtype=np.uint8)
    for shape, label in (*_BASE_LAYERS, *_Z_LAYERS, *_OVERLAY_LAYERS):
        labels[_ellipsoid(x, y, z_arr, shape)] = label
    for rib in _RIBS:
        labels[_ellipsoid(x, y, z_arr, rib) & _ribs_present(z_arr)] = Tissue.BONE
    return labels


def _ribs_present(z: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Ribs run obliquely, so an axial slice cuts them only over part of each rib period."""
    return np.asarray(np.cos(2.0 * math.pi * z / _RIB_PERIOD_MM) > -0.3)


class SliceRenderer:
    """Render axial slices of the phantom on a fixed voxel grid.

    The z-independent anatomy is labelled once; each slice then only evaluates the lungs and heart,
    giving the same labels as :func:`tissue_labels` at the voxel centres.

    Parameters
    ----------
    geometry : VolumeGeometry
        The voxel grid.
    """

    def __init__(self, geometry: VolumeGeometry) -> None:
        self.geometry = geometry
        self.xs, self.ys = geometry.x_mm(), geometry.y_mm()
        self._x, self._y = self.xs.astype(np.float32)[None, :], self.ys.astype(np.float32)[:, None]
        shape = (self.ys.size, self.xs.size)
        self._base = np.zeros(shape, dtype=np.uint8)
        for layer, label in _BASE_LAYERS:
            self._base[_ellipsoid(self._x, self._y, 0.0, layer)] = label
        self._overlay = np.zeros(shape, dtype=np.uint8)  # 0 (AIR) = no overlay
        for layer, label in _OVERLAY_LAYERS:
            self._overlay[_ellipsoid(self._x, self._y, 0.0, layer)] = label
        self._overlay_ribs = self._overlay.copy()
        for rib in _RIBS:
            self._overlay_ribs[_ellipsoid(self._x, self._y, 0.0, rib)] = Tissue.BONE

    def labels(self, k: int) -> npt.NDArray[np.uint8]:
        """Return the ``(rows, columns)`` tissue labels of slice ``k`` (without nodules)."""
        z = self.geometry.z_mm(k)
        labels = self._base.copy()
        for layer, label in _Z_LAYERS:
            labels[_ellipsoid(self._x, self._y, z, layer)] = label
        overlay = self._overlay_ribs if bool(_ribs_present(np.asarray(z))) else self._overlay
        return np.where(overlay > 0, overlay, labels)

    def hu(self, k: int, nodules: Sequence[Nodule], rng: np.random.Generator) -> npt.NDArray[np.float32]:
        """Render slice ``k`` in HU.

        Parameters
        ----------
        k : int
            0-based slice index.
        nodules : sequence of Nodule
            Spheres painted over the anatomy (voxels whose centre lies inside a sphere).
        rng : numpy.random.Generator
            Noise source; one ``(rows, columns)`` standard-normal draw is consumed.

        Returns
        -------
        numpy.ndarray of float32
            ``(rows, columns)`` HU: tissue mean plus Gaussian noise of the tissue's sigma.
        """
        labels = self.labels(k)
        mean, sigma = _HU_LUT[labels], _SIGMA_LUT[labels]
        for nodule, rows, cols, mask in _nodule_discs(self.xs, self.ys, self.geometry.z_mm(k), nodules):
            mean[rows, cols][mask] = nodule.hu
            sigma[rows, cols][mask] = _NODULE_SIGMA
        noise = rng.standard_normal(labels.shape, dtype=np.float32)
        return np.asarray(mean + sigma * noise, dtype=np.float32)

    def nodule_mask(self, k: int, nodules: Sequence[Nodule]) -> npt.NDArray[np.bool_]:
        """Return the ``(rows, columns)`` truth mask of slice ``k``: True where :meth:`hu` paints a nodule."""
        mask = np.zeros((self.ys.size, self.xs.size), dtype=bool)
        for _, rows, cols, disc in _nodule_discs(self.xs, self.ys, self.geometry.z_mm(k), nodules):
            mask[rows, cols] |= disc
        return mask


def _disc_window(
    xs: FloatArray, ys: FloatArray, centre: tuple[float, float], radius_sq: float
) -> tuple[slice, slice, npt.NDArray[np.bool_]]:
    """Rows/columns window and in-disc mask of a disc on a slice's ascending coordinate axes."""
    r = math.sqrt(radius_sq)
    c0, c1 = (int(i) for i in np.searchsorted(xs, [centre[0] - r, centre[0] + r], side="left"))
    r0, r1 = (int(i) for i in np.searchsorted(ys, [centre[1] - r, centre[1] + r], side="left"))
    c1, r1 = min(c1 + 1, xs.size), min(r1 + 1, ys.size)
    dist_sq = np.square(xs[c0:c1] - centre[0])[None, :] + np.square(ys[r0:r1] - centre[1])[:, None]
    return slice(r0, r1), slice(c0, c1), dist_sq <= radius_sq


def _nodule_discs(
    xs: FloatArray, ys: FloatArray, z: float, nodules: Sequence[Nodule]
) -> Iterator[tuple[Nodule, slice, slice, npt.NDArray[np.bool_]]]:
    """Yield each nodule cutting plane ``z`` with its window and mask (voxel centre inside sphere)."""
    for nodule in nodules:
        cx, cy, cz = nodule.center_mm
        radius_sq = nodule.radius_mm**2 - (z - cz) ** 2
        if radius_sq >= 0.0:
            rows, cols, mask = _disc_window(xs, ys, (cx, cy), radius_sq)
            yield nodule, rows, cols, mask


def _as_pair(spacing: float | tuple[float, float]) -> tuple[float, float]:
    if isinstance(spacing, tuple):
        return (float(spacing[0]), float(spacing[1]))
    return (float(spacing), float(spacing))


def phantom_hu(
    shape: tuple[int, int, int],
    pixel_spacing: float | tuple[float, float],
    slice_spacing: float,
    nodules: Sequence[Nodule],
    rng: np.random.Generator,
) -> npt.NDArray[np.float32]:
    """Render the phantom as a float32 HU volume ``(slices, rows, columns)``.

    Slices are rendered one at a time in slice order, drawing noise from ``rng``; with the noise
    generator of :func:`rng_streams` this reproduces the pixels of :func:`synth_ct_datasets` (before
    rounding and clipping to the stored range).

    Parameters
    ----------
    shape : tuple of int
        ``(slices, rows, columns)``.
    pixel_spacing : float or tuple of float
        In-plane spacing in mm; a pair is ``(row spacing, column spacing)``.
    slice_spacing : float
        Distance between slice centres in mm.
    nodules : sequence of Nodule
        Spheres painted over the anatomy (voxels whose centre lies inside the sphere).
    rng : numpy.random.Generator
        Noise source.

    Returns
    -------
    numpy.ndarray of float32
        HU values.
    """
    geom = VolumeGeometry(shape, _as_pair(pixel_spacing), float(slice_spacing))
    renderer = SliceRenderer(geom)
    volume = np.empty(shape, dtype=np.float32)
    for k in range(shape[0]):
        volume[k] = renderer.hu(k, nodules, rng)
    return volume


def nodule_mask(
    shape: tuple[int, int, int],
    pixel_spacing: float | tuple[float, float],
    slice_spacing: float,
    nodules: Sequence[Nodule],
) -> npt.NDArray[np.bool_]:
    """Return the voxel truth mask ``(slices, rows, columns)``: True where a nodule was painted.

    Parameters
    ----------
    shape : tuple of int
        ``(slices, rows, columns)``.
    pixel_spacing : float or tuple of float
        In-plane spacing in mm; a pair is ``(row spacing, column spacing)``.
    slice_spacing : float
        Distance between slice centres in mm.
    nodules : sequence of Nodule
        The nodules.

    Returns
    -------
    numpy.ndarray of bool
        The union of all nodules, exactly matching the rendered voxels.
    """
    renderer = SliceRenderer(VolumeGeometry(shape, _as_pair(pixel_spacing), float(slice_spacing)))
    mask = np.zeros(shape, dtype=bool)
    for k in range(shape[0]):
        mask[k] = renderer.nodule_mask(k, nodules)
    return mask
