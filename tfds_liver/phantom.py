"""Synthetic abdominal CT phantoms written as real DICOM series, with per-slice lesion labels.

Each patient is a contiguous axial CT series through the liver: body outline, subcutaneous and
visceral fat, abdominal wall and paraspinal muscles, spine (cortical ring, cancellous core, discs),
ribs, aorta and IVC, kidneys, spleen, stomach, bowel loops, gallbladder, a two-lobed liver whose
shape changes along z with hepatic vessels, and — for lesion patients — 3-D hypo- or hyperdense
lesions that span adjacent slices. Edges are blurred by a point-spread function and the image gets
spatially correlated noise plus low-frequency texture. A slice is labelled `lesion` when a lesion
is visible on it (its lesion mask is not empty), else `normal`.

Everything is drawn in millimetres and lesions are placed on a fixed planning grid, so the same
seed gives the same patients at every image size: a phantom at size 128 looks like the one at 512
averaged down (noise is scaled so), and differs only where a lesion section is too small for the
coarser grid.

    python -m tfds_liver.phantom --out DIR --patients 8 --seed 0 [--size 512] [--masks]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import math
import pathlib
import re
import uuid
from collections.abc import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)

from tfds_liver import labels

# --- labels.csv ------------------------------------------------------------------------------
SOURCE = "phantom"  # the `source` column of every row
IMAGE_SERIES_DIR = "ct"  # out_dir/<patient_id>/ct/<nnn>.dcm
LESION_MASK_DIR, LIVER_MASK_DIR = "masks_lesion", "masks_liver"
MASK_ON = 255  # pixel value of a mask pixel in the mask series

# --- defaults of write_phantom -----------------------------------------------------------------
DEFAULT_SIZE = 512  # rows = columns of the written images
DEFAULT_SLICES = 16  # slices per series
DEFAULT_LESION_PATIENT_FRACTION = 0.75  # share of patients who have lesions; the others none
MIN_SIZE = 32  # below this the anatomy is no longer drawable

# --- DICOM encoding: stored = HU + 1024 in 12 of 16 bits, abdominal window ----------------------
RESCALE_INTERCEPT = -1024
RESCALE_SLOPE = 1
BITS_ALLOCATED, BITS_STORED = 16, 12
HU_MIN, HU_MAX = RESCALE_INTERCEPT, RESCALE_INTERCEPT + 2**BITS_STORED - 1  # -1024 .. 3071
WINDOW_CENTER, WINDOW_WIDTH = 40, 400  # abdomen soft-tissue window
KVP = 120
CT_SERIES_NUMBER, LESION_MASK_SERIES_NUMBER, LIVER_MASK_SERIES_NUMBER = 2, 101, 102
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "liverjax/tfds_liver/phantom")  # of every UID
STUDY_YEARS = (2012, 2025)  # study dates are drawn from [first, last) Jan 1st
AGE_YEARS = (30, 86)

# --- geometry (mm) -------------------------------------------------------------------------------
BODY_HALF_WIDTH_MM = (135.0, 185.0)  # lateral semi-axis of the body outline
BODY_AP_RATIO = (0.66, 0.82)  # antero-posterior / lateral semi-axis
BODY_Z_WOBBLE = (0.01, 0.05)  # relative change of body size along z
FOV_MARGIN = (1.06, 1.20)  # field of view / body width
FOV_MM = (300.0, 500.0)
SLICE_THICKNESSES_MM = (2.5, 3.0, 3.0, 5.0)  # contiguous reconstructions, 3 mm the most common
LIVER_LENGTH_MM = (130.0, 175.0)  # cranio-caudal extent of the liver
LIVER_SCAN_RANGE = (0.08, 0.92)  # part of the liver (0 = dome, 1 = tip) a short scan stays in
SUBCUTANEOUS_FAT_MM = (8.0, 40.0)
WALL_MUSCLE_MM = (6.0, 14.0)

# --- tissues (HU, non-contrast) ----------------------------------------------------------------
HU_AIR = -1000.0
FAT_HU = (-110.0, -85.0)
MUSCLE_HU = (45.0, 55.0)
LIVER_HU = (55.0, 65.0)
SPLEEN_HU = (42.0, 50.0)
KIDNEY_HU = (28.0, 38.0)
BLOOD_HU = (35.0, 45.0)
FLUID_HU = (5.0, 25.0)  # gallbladder, stomach and bowel contents
CSF_HU = (5.0, 15.0)
CANCELLOUS_HU = (180.0, 280.0)
CORTICAL_HU = (600.0, 1000.0)
DISC_HU = (70.0, 100.0)
TABLE_HU = 200.0  # carbon-fibre shell of the table
TABLE_FOAM_HU = -900.0
TABLE_HALF_WIDTH_MM = 210.0
HEPATIC_VESSEL_CONTRAST_HU = (-15.0, -8.0)  # unenhanced vessels are a little below parenchyma

# --- lesions ---------------------------------------------------------------------------------
LESION_DIAMETER_MM = (4.0, 30.0)  # drawn uniformly
LESION_CONTRAST_HU = (15.0, 60.0)  # |lesion - liver|, drawn uniformly; hypo and hyper alternate
LESION_EDGE_MM = (0.5, 3.0)  # width of the soft margin, sharp cysts to ill-defined metastases
LESION_SHAPE_JITTER = 0.15  # relative spread of the three semi-axes
LESION_LOBULATION = 0.12  # maximum relative boundary modulation
# Thinner cross-sections (ends of a lesion) are neither drawn nor labelled. Raise it with
# `min_lesion_mm` where images are stored coarser than the lesions' ends can show.
MIN_VISIBLE_DIAMETER_MM = 3.0
LESION_MARGIN_MM = 1.0  # lesion boundary must lie this far inside the liver at its centre
LESION_GAP_MM = 2.0  # minimum distance between two lesions
LESION_SCAN_MM_PER_LESION = 26.0  # expected extra lesions = scan length / this
MAX_LESIONS = 8
LESION_PLACEMENT_TRIES = 200
LESION_PLANNING_SIZE = 256  # grid on which lesions are placed, whatever the output size

# --- image formation -------------------------------------------------------------------------
REFERENCE_SPACING_MM = 0.75  # pixel spacing at which NOISE_HU is the per-pixel standard deviation
NOISE_HU = (10.0, 20.0)  # quantum noise; larger patients get the noisier end
NOISE_CORRELATION_MM = 0.5  # Gaussian sigma of the noise autocorrelation
TEXTURE_HU = (2.0, 5.0)  # low-frequency mottle
TEXTURE_CORRELATION_MM = 5.0
PSF_SIGMA_MM = 0.5  # in-plane blur of the reconstruction

# tissue codes of the label map used while drawing
_AIR, _FAT, _MUSCLE, _VISCERA, _LIVER, _LIVER_VESSEL, _ORGAN, _BONE = range(8)


@dataclasses.dataclass(frozen=True)
class Lesion:
    """One drawn lesion: centre (x, y, z mm, patient coordinates), size, contrast to the liver."""

    center_mm: tuple[float, float, float]
    diameter_mm: float
    contrast_hu: float
    slices: tuple[int, ...]  # slice indices on which it is visible


@dataclasses.dataclass(frozen=True)
class SeriesMeta:
    """Patient, study and geometry of one phantom series (everything DICOM needs but pixels)."""

    patient_id: str
    patient_name: str
    sex: str
    birth_date: datetime.date
    study_date: datetime.date
    study_time: str
    accession_number: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_uids: tuple[str, ...]
    pixel_spacing_mm: float
    slice_thickness_mm: float
    origin_mm: tuple[float, float]  # x, y of the centre of pixel (0, 0)
    z_mm: tuple[float, ...]  # ImagePositionPatient z per slice, cranial first


@dataclasses.dataclass(frozen=True)
class Patient:
    """A phantom series: HU volume, per-slice labels, masks and metadata."""

    hu: np.ndarray  # int16 (slices, size, size)
    labels: np.ndarray  # int64 (slices,): 0 normal, 1 lesion
    lesion_mask: np.ndarray  # bool (slices, size, size)
    liver_mask: np.ndarray  # bool (slices, size, size)
    lesions: tuple[Lesion, ...]
    meta: SeriesMeta


@dataclasses.dataclass
class _Canvas:
    """The volume being drawn: HU, tissue codes, and the pixel-centre coordinates in mm."""

    x: np.ndarray  # (W,) patient x of each column
    y: np.ndarray  # (H,) patient y of each row
    z: np.ndarray  # (S,) patient z of each slice
    hu: np.ndarray  # float32 (S, H, W)
    tissue: np.ndarray  # int8 (S, H, W)
    spacing: float  # mm between pixel centres

    def _range(self, axis: np.ndarray, low: float, high: float) -> slice:
        start = int(np.floor((low - axis[0]) / self.spacing))
        stop = int(np.ceil((high - axis[0]) / self.spacing)) + 1
        return slice(min(max(start, 0), axis.size), min(max(stop, 0), axis.size))

    def ellipse(self, cx, cy, ax, ay, *, angle: float = 0.0) -> tuple[slice, slice, np.ndarray]:
        """Rows, columns and (S, h, w) inside-mask of a per-slice ellipse (arrays or scalars).

        Solved row by row: each row of an ellipse is one interval of x, so the per-pixel work is
        two comparisons.
        """
        shape = (self.z.size,)
        cx, cy, ax, ay = (
            np.broadcast_to(np.asarray(v, np.float32), shape) for v in (cx, cy, ax, ay)
        )
        present = (ax > 0) & (ay > 0)
        if not present.any():
            return slice(0, 0), slice(0, 0), np.zeros((self.z.size, 0, 0), bool)
        c, s = math.cos(angle), math.sin(angle)
        reach_x = np.sqrt((ax * c) ** 2 + (ay * s) ** 2)[present].max()
        reach_y = np.sqrt((ax * s) ** 2 + (ay * c) ** 2)[present].max()
        rows = self._range(
            self.y, float(cy[present].min() - reach_y), float(cy[present].max() + reach_y)
        )
        cols = self._range(
            self.x, float(cx[present].min() - reach_x), float(cx[present].max() + reach_x)
        )
        inv_x2 = 1.0 / np.maximum(ax, 1e-3)[:, None, None] ** 2
        inv_y2 = 1.0 / np.maximum(ay, 1e-3)[:, None, None] ** 2
        qa = c * c * inv_x2 + s * s * inv_y2  # qa dx^2 + qb dx dy + qc dy^2 <= 1
        qb = 2 * c * s * (inv_x2 - inv_y2)
        qc = s * s * inv_x2 + c * c * inv_y2
        dy = self.y[rows][None, :, None] - cy[:, None, None]
        disc = (qb * dy) ** 2 - 4 * qa * (qc * dy * dy - 1)
        root = np.sqrt(np.maximum(disc, 0))
        lo = np.where(disc >= 0, (-qb * dy - root) / (2 * qa), np.inf) + cx[:, None, None]
        hi = np.where(disc >= 0, (-qb * dy + root) / (2 * qa), -np.inf) + cx[:, None, None]
        lo = np.where(present[:, None, None], lo, np.inf)
        xs = self.x[cols][None, None, :]
        return rows, cols, (xs >= lo) & (xs <= hi)

    def box(self, x0: float, y0: float, x1: float, y1: float) -> tuple[slice, slice, np.ndarray]:
        """Rows, columns and inside-mask of an axis-aligned rectangle on every slice."""
        rows, cols = self._range(self.y, y0, y1), self._range(self.x, x0, x1)
        inside = ((self.y[rows] >= y0) & (self.y[rows] <= y1))[:, None] & (
            (self.x[cols] >= x0) & (self.x[cols] <= x1)
        )[None, :]
        return rows, cols, np.broadcast_to(inside, (self.z.size, *inside.shape))

    def paint(self, region, value, tissue: int, within: np.ndarray | None = None) -> None:
        """Set HU and tissue code inside `region` (optionally only where `within` is true)."""
        rows, cols, inside = region
        if within is not None:
            inside = inside & within[:, rows, cols]
        np.copyto(self.hu[:, rows, cols], np.float32(value), where=inside)
        np.copyto(self.tissue[:, rows, cols], np.int8(tissue), where=inside)


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(*bounds))


def _profile(u: np.ndarray, start: float, end: float) -> np.ndarray:
    """Half-ellipse in [start, end] of the liver coordinate u, 0 outside."""
    t = (u - start) / (end - start) * 2.0 - 1.0
    return np.sqrt(np.clip(1.0 - t * t, 0.0, None))


def _bumps(rng: np.random.Generator, lobe: dict, u: np.ndarray, count: int) -> list[dict]:
    """Smaller ellipses on the rim of a lobe whose union with it gives a lobulated outline."""
    bumps = []
    for _ in range(count):
        t = rng.uniform(0, 2 * np.pi) + rng.uniform(-1.0, 1.0) * u  # drifts along z
        r = rng.uniform(0.35, 0.65)
        bumps.append(
            dict(
                cx=lobe["cx"] + r * lobe["ax"] * np.cos(t),
                cy=lobe["cy"] + r * lobe["ay"] * np.sin(t),
                ax=lobe["ax"] * rng.uniform(0.3, 0.55),
                ay=lobe["ay"] * rng.uniform(0.3, 0.55),
            )
        )
    return bumps


def _draw_anatomy(canvas: _Canvas, rng: np.random.Generator, body: dict) -> dict:
    """Draw everything but lesions; returns the liver geometry lesions are placed in."""
    z, u = canvas.z, body["u"]
    cx, cy, a, b = body["cx"], body["cy"], body["a"], body["b"]
    fat_hu = _uniform(rng, FAT_HU)
    muscle_hu = _uniform(rng, MUSCLE_HU)
    cortical_hu = _uniform(rng, CORTICAL_HU)
    cancellous_hu = _uniform(rng, CANCELLOUS_HU)
    blood_hu = _uniform(rng, BLOOD_HU)

    # table under the patient: foam between two thin carbon-fibre shells
    table_y = body["back_y"] + rng.uniform(1.0, 6.0)
    for top, height, hu in (
        (table_y, 12.0, TABLE_FOAM_HU),
        (table_y, 2.0, TABLE_HU),
        (table_y + 10.0, 2.0, TABLE_HU),
    ):
        canvas.paint(
            canvas.box(cx - TABLE_HALF_WIDTH_MM, top, cx + TABLE_HALF_WIDTH_MM, top + height),
            hu,
            _BONE if hu > 0 else _AIR,
        )

    # body: fat, then the abdominal wall muscle, then the visceral cavity (fat)
    fat = _uniform(rng, SUBCUTANEOUS_FAT_MM)
    fat_back = fat * rng.uniform(0.5, 0.9)
    wall = _uniform(rng, WALL_MUSCLE_MM)
    rows, cols, inside = canvas.ellipse(cx, cy, a, b)
    inside &= canvas.y[rows][None, :, None] <= body["back_y"]
    canvas.paint((rows, cols, inside), fat_hu, _FAT)
    front = cy - b
    wall_cy = (front + fat + body["back_y"] - fat_back) / 2
    wall_b = (body["back_y"] - fat_back - front - fat) / 2
    canvas.paint(canvas.ellipse(cx, wall_cy, a - fat, wall_b), muscle_hu, _MUSCLE)
    cav_a, cav_b = a - fat - wall, wall_b - wall
    region = canvas.ellipse(cx, wall_cy, cav_a, cav_b)
    canvas.paint(region, fat_hu + rng.uniform(0.0, 10.0), _VISCERA)
    cavity = canvas.tissue == _VISCERA

    # ribs along the wall in the upper abdomen
    rib_hu = cortical_hu * rng.uniform(0.6, 0.8)
    for angle in rng.uniform(0.15, 0.95, int(rng.integers(6, 11))) * np.pi:
        side = 1.0 if rng.random() < 0.5 else -1.0
        theta = angle if side > 0 else np.pi - angle
        theta = theta if rng.random() < 0.8 else -theta  # a few anterior ribs
        present = ((z + rng.uniform(0, 40)) % 40 < 20) & (u < rng.uniform(0.45, 0.7))
        rx = cx + (a - fat - wall / 2) * math.cos(theta)
        ry = wall_cy + (wall_b - wall / 2) * math.sin(theta)
        size = np.where(present, 1.0, 0.0)
        canvas.paint(canvas.ellipse(rx, ry, 7.0 * size, 4.5 * size, angle=theta), rib_hu, _BONE)
        canvas.paint(
            canvas.ellipse(rx, ry, 4.5 * size, 2.5 * size, angle=theta), cancellous_hu, _BONE
        )

    # bowel loops (fluid or gas with a wall) in the lower abdomen
    for _ in range(int(rng.integers(14, 22))):
        bx = cx + rng.uniform(-0.75, 0.75) * cav_a + rng.uniform(-15, 15) * u
        by = wall_cy + rng.uniform(-0.75, 0.5) * cav_b + rng.uniform(-15, 15) * u
        start = rng.uniform(0.2, 0.8)
        radius = rng.uniform(8.0, 18.0) * _profile(u, start, start + rng.uniform(0.3, 0.8))
        content = HU_AIR if rng.random() < 0.3 else _uniform(rng, FLUID_HU)
        canvas.paint(canvas.ellipse(bx, by, radius, radius), muscle_hu - 10, _ORGAN, cavity)
        inner = np.maximum(radius - 2.0, 0.0)
        canvas.paint(canvas.ellipse(bx, by, inner, inner), content, _ORGAN, cavity)

    # stomach with an air cap, spleen (patient left = +x)
    sx, sy = cx + cav_a * rng.uniform(0.25, 0.45), wall_cy - cav_b * rng.uniform(0.15, 0.35)
    size = _profile(u, -0.2, rng.uniform(0.5, 0.7))
    sax, say = rng.uniform(35, 55) * size, rng.uniform(25, 40) * size
    canvas.paint(canvas.ellipse(sx, sy, sax, say, angle=0.3), muscle_hu - 5, _ORGAN, cavity)
    rows, cols, inside = canvas.ellipse(sx, sy, sax - 3.0 * size, say - 3.0 * size, angle=0.3)
    canvas.paint((rows, cols, inside), _uniform(rng, FLUID_HU), _ORGAN, cavity)
    cap = canvas.y[rows][None, :, None] < (sy - say * rng.uniform(0.2, 0.6))[:, None, None]
    canvas.paint((rows, cols, inside & cap), HU_AIR, _AIR, cavity)
    size = _profile(u, -0.1, rng.uniform(0.5, 0.65))
    canvas.paint(
        canvas.ellipse(
            cx + cav_a * 0.62,
            wall_cy + cav_b * 0.35,
            rng.uniform(35, 50) * size,
            rng.uniform(20, 30) * size,
            angle=-0.6,
        ),
        _uniform(rng, SPLEEN_HU),
        _ORGAN,
        cavity,
    )

    # liver: right lobe (patient right = -x) and left lobe with bumps, shape drifting along u
    liver_hu = _uniform(rng, LIVER_HU)
    right = np.sqrt(np.clip(np.sin(np.pi * np.clip(u, 0, 1) ** 0.8), 0, None))
    left = np.sqrt(np.clip(1 - u / rng.uniform(0.45, 0.65), 0, 1) * np.clip(u / 0.1, 0, 1))
    rl = dict(
        cx=cx - cav_a * rng.uniform(0.35, 0.5) - 8.0 * u,
        cy=wall_cy - cav_b * rng.uniform(0.0, 0.15) - 10.0 * u,
        ax=cav_a * rng.uniform(0.45, 0.6) * right,
        ay=cav_b * rng.uniform(0.65, 0.85) * right,
    )
    ll = dict(
        cx=cx + cav_a * rng.uniform(-0.05, 0.15),
        cy=wall_cy - cav_b * rng.uniform(0.3, 0.45),
        ax=cav_a * rng.uniform(0.3, 0.45) * left,
        ay=cav_b * rng.uniform(0.2, 0.3) * left,
    )
    for lobe in (rl, ll, *_bumps(rng, rl, u, 3), *_bumps(rng, ll, u, 1)):
        canvas.paint(
            canvas.ellipse(lobe["cx"], lobe["cy"], lobe["ax"], lobe["ay"]), liver_hu, _LIVER, cavity
        )
    liver = canvas.tissue == _LIVER
    for _ in range(int(rng.integers(3, 6))):  # hepatic veins: tubes drifting through the liver
        r0, t0 = rng.uniform(0.1, 0.6), rng.uniform(0, 2 * np.pi)
        t = t0 + rng.uniform(-0.5, 0.5) * u
        vx, vy = rl["cx"] + r0 * rl["ax"] * np.cos(t), rl["cy"] + r0 * rl["ay"] * np.sin(t)
        radius = rng.uniform(2.5, 4.5) * (right > 0.2)
        canvas.paint(
            canvas.ellipse(vx, vy, radius, radius),
            liver_hu + _uniform(rng, HEPATIC_VESSEL_CONTRAST_HU),
            _LIVER_VESSEL,
            liver,
        )
    if rng.random() < 0.6:  # gallbladder under the medial edge of the right lobe
        size = _profile(u, rng.uniform(0.4, 0.55), rng.uniform(0.8, 0.95))
        canvas.paint(
            canvas.ellipse(
                rl["cx"] + rl["ax"] * 0.6,
                rl["cy"] - rl["ay"] * 0.35,
                rng.uniform(10, 16) * size,
                rng.uniform(18, 26) * size,
                angle=0.8,
            ),
            _uniform(rng, FLUID_HU),
            _ORGAN,
            cavity,
        )

    # retroperitoneum: kidneys, psoas, IVC and aorta in front of the spine
    spine_r = rng.uniform(16.0, 22.0)
    depth = rng.uniform(40.0, 52.0)  # paraspinal muscles between the back fat and the canal
    canal_y = body["back_y"] - fat_back - depth
    spine_y = canal_y - spine_r - 9.0
    kidney_hu, kidney_u = _uniform(rng, KIDNEY_HU), rng.uniform(0.6, 0.85)
    half = rng.uniform(50.0, 60.0) / body["liver_length"]
    for side, shift in ((-1.0, 0.0), (1.0, -rng.uniform(0.03, 0.1))):
        size = _profile(u, kidney_u + shift - half, kidney_u + shift + half)
        canvas.paint(
            canvas.ellipse(
                cx + side * (spine_r + rng.uniform(35, 45)),
                spine_y,
                rng.uniform(22, 30) * size,
                rng.uniform(18, 24) * size,
                angle=side * 0.5,
            ),
            kidney_hu,
            _ORGAN,
        )
        psoas = np.clip((u - 0.55) / 0.45, 0, 1) * rng.uniform(15, 22)
        canvas.paint(
            canvas.ellipse(cx + side * (spine_r + 10), spine_y - 2, psoas, psoas * 0.9),
            muscle_hu,
            _MUSCLE,
        )
    canvas.paint(canvas.ellipse(cx - 22, spine_y - spine_r - 14, 12.0, 9.0), blood_hu - 3, _ORGAN)
    aorta = rng.uniform(9.0, 13.0)
    canvas.paint(
        canvas.ellipse(cx + 14, spine_y - spine_r - aorta - 2, aorta, aorta), blood_hu, _ORGAN
    )

    # spine: paraspinal muscles, posterior arch, canal, spinous process, vertebral body or disc
    for side in (-1.0, 1.0):
        canvas.paint(
            canvas.ellipse(
                cx + side * 30, canal_y + depth * 0.45, rng.uniform(22, 28), depth * 0.55
            ),
            muscle_hu,
            _MUSCLE,
        )
    canvas.paint(canvas.ellipse(cx, canal_y, 15.0, 14.0), cortical_hu * 0.7, _BONE)
    canvas.paint(canvas.ellipse(cx, canal_y, 9.0, 8.0), _uniform(rng, CSF_HU), _ORGAN)
    canvas.paint(canvas.ellipse(cx, canal_y + 20, 4.0, 12.0), cortical_hu * 0.7, _BONE)
    level = (z + rng.uniform(0, 40)) % rng.uniform(30, 36)
    disc = level < rng.uniform(7, 10)
    canvas.paint(canvas.ellipse(cx, spine_y, spine_r, spine_r * 0.9), cortical_hu, _BONE)
    core = np.where(disc, 0.0, spine_r - 2.0)
    canvas.paint(canvas.ellipse(cx, spine_y, core, core * 0.9), cancellous_hu, _BONE)
    disc_r = np.where(disc, spine_r, 0.0)
    canvas.paint(canvas.ellipse(cx, spine_y, disc_r, disc_r * 0.9), _uniform(rng, DISC_HU), _ORGAN)
    return dict(liver_hu=liver_hu, lobes=(rl, ll))


def _liver_mask(tissue: np.ndarray) -> np.ndarray:
    """Liver parenchyma and the vessels inside it, as organ masks usually include them."""
    return (tissue == _LIVER) | (tissue == _LIVER_VESSEL)


@dataclasses.dataclass(frozen=True)
class _LesionSpec:
    """A planned lesion: ellipsoid (semi-axes, in-plane rotation), lobulated outline, contrast."""

    center: tuple[float, float, float]  # mm
    semi: tuple[float, float, float]  # mm
    rotation: float  # radians
    lobulation: tuple[float, int, float]  # amplitude, number of lobes, phase
    contrast_hu: float
    edge_mm: float


def _lesion_section(
    canvas: _Canvas,
    spec: _LesionSpec,
    t: int,
    liver_mask: np.ndarray,
    min_visible_mm: float = MIN_VISIBLE_DIAMETER_MM,
) -> tuple[slice, slice, np.ndarray, np.ndarray] | None:
    """Rows, columns, blend weight and mask of a lesion on slice t; None where it is not visible."""
    (cx, cy, cz), (sx, sy, sz) = spec.center, spec.semi
    frac = 1.0 - ((canvas.z[t] - cz) / sz) ** 2
    if frac <= 0:
        return None
    rx, ry = sx * math.sqrt(frac), sy * math.sqrt(frac)
    if 2 * math.sqrt(rx * ry) < min_visible_mm:
        return None
    amp, lobes, phase = spec.lobulation
    reach = max(rx, ry) * (1 + amp) + spec.edge_mm
    rows = canvas._range(canvas.y, cy - reach, cy + reach)
    cols = canvas._range(canvas.x, cx - reach, cx + reach)
    dx = canvas.x[cols][None, :] - cx
    dy = canvas.y[rows][:, None] - cy
    c, s = math.cos(spec.rotation), math.sin(spec.rotation)
    px, py = (c * dx + s * dy) / rx, (-s * dx + c * dy) / ry
    rho = np.sqrt(px * px + py * py) / (1 + amp * np.cos(lobes * np.arctan2(py, px) + phase))
    inside_liver = liver_mask[t, rows, cols]
    mask = (rho <= 1.0) & inside_liver
    if mask.sum() * canvas.spacing**2 < np.pi * (min_visible_mm / 2) ** 2:
        return None
    distance = (1.0 - rho) * math.sqrt(rx * ry)  # ~mm inside the boundary
    weight = np.clip(distance / spec.edge_mm + 0.5, 0.0, 1.0)
    weight = weight * weight * (3 - 2 * weight) * inside_liver  # smoothstep margin
    return rows, cols, weight.astype(np.float32), mask


def _plan_lesions(
    canvas: _Canvas,
    rng: np.random.Generator,
    liver: dict,
    count: int,
    slice_mm: float,
    contrast_hu: tuple[float, float],
    diameter_mm: tuple[float, float],
    min_visible_mm: float,
) -> list[_LesionSpec]:
    """Choose up to `count` lesions well inside the liver drawn on `canvas`, apart from others."""
    liver_mask = _liver_mask(canvas.tissue)
    spacing, z = canvas.spacing, canvas.z

    def in_liver(s: int, xs: np.ndarray, ys: np.ndarray) -> bool:
        cols = np.rint((xs - canvas.x[0]) / spacing).astype(int)
        rows = np.rint((ys - canvas.y[0]) / spacing).astype(int)
        ok = (cols >= 0) & (cols < canvas.x.size) & (rows >= 0) & (rows < canvas.y.size)
        return bool(ok.all() and liver_mask[s, rows, cols].all())

    specs: list[_LesionSpec] = []
    ring = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    first_sign = 1.0 if rng.random() < 0.5 else -1.0
    for _ in range(LESION_PLACEMENT_TRIES):
        if len(specs) == count:
            break
        s = int(rng.integers(z.size))
        lobe = liver["lobes"][0 if rng.random() < 0.8 else 1]
        rad, ang = math.sqrt(rng.random()) * 0.85, rng.uniform(0, 2 * np.pi)
        diameter = rng.uniform(*diameter_mm)
        semi = diameter / 2 * (1 + rng.uniform(-LESION_SHAPE_JITTER, LESION_SHAPE_JITTER, 3))
        dz, rotation = rng.uniform(-0.5, 0.5) * slice_mm, rng.uniform(0, np.pi)
        lobulation = (
            rng.uniform(0, LESION_LOBULATION),
            int(rng.integers(3, 6)),
            rng.uniform(0, 2 * np.pi),
        )
        # hypo and hyper alternate within a patient, so both kinds are equally common
        contrast = first_sign * (-1) ** len(specs) * rng.uniform(*contrast_hu)
        edge = rng.uniform(*LESION_EDGE_MM)
        center = np.array(
            [
                lobe["cx"][s] + rad * lobe["ax"][s] * math.cos(ang),
                lobe["cy"][s] + rad * lobe["ay"][s] * math.sin(ang),
                z[s] + dz,
            ]
        )
        reach = float(semi[:2].max()) + LESION_MARGIN_MM
        if not in_liver(s, center[0] + reach * np.cos(ring), center[1] + reach * np.sin(ring)):
            continue
        if any(
            np.linalg.norm(center - np.array(o.center)) < semi.max() + max(o.semi) + LESION_GAP_MM
            for o in specs
        ):
            continue
        spec = _LesionSpec(
            center=tuple(float(v) for v in center),
            semi=tuple(float(v) for v in semi),
            rotation=float(rotation),
            lobulation=lobulation,
            contrast_hu=float(contrast),
            edge_mm=float(edge),
        )
        if any(_lesion_section(canvas, spec, t, liver_mask, min_visible_mm) for t in range(z.size)):
            specs.append(spec)
    return specs


def _draw_lesions(
    canvas: _Canvas, specs: list[_LesionSpec], liver_hu: float, min_visible_mm: float
) -> tuple[list[Lesion], np.ndarray]:
    """Blend the lesions into the liver of `canvas`; returns those visible and the lesion mask."""
    liver_mask = _liver_mask(canvas.tissue)
    lesion_mask = np.zeros(canvas.hu.shape, bool)
    lesions = []
    for spec in specs:
        shown = []
        for t in range(canvas.z.size):
            section = _lesion_section(canvas, spec, t, liver_mask, min_visible_mm)
            if section is None:
                continue
            rows, cols, weight, mask = section
            block = canvas.hu[t, rows, cols]
            block += weight * (liver_hu + spec.contrast_hu - block)
            lesion_mask[t, rows, cols] |= mask
            shown.append(t)
        if shown:
            lesions.append(
                Lesion(
                    center_mm=tuple(round(v, 2) for v in spec.center),
                    diameter_mm=round(2 * float(np.cbrt(np.prod(spec.semi))), 2),
                    contrast_hu=round(spec.contrast_hu, 2),
                    slices=tuple(shown),
                )
            )
    return lesions, lesion_mask


def _new_canvas(fov: float, size: int, z: np.ndarray) -> _Canvas:
    """An empty (air) canvas of size x size pixels over `fov` mm, centred on the origin."""
    spacing = _pixel_spacing(fov, size)
    axis = np.round(np.arange(size) * spacing - (size - 1) / 2 * spacing, 6).astype(np.float32)
    return _Canvas(
        x=axis,
        y=axis.copy(),
        z=z,
        hu=np.full((z.size, size, size), HU_AIR, np.float32),
        tissue=np.zeros((z.size, size, size), np.int8),
        spacing=spacing,
    )


def _pixel_spacing(fov: float, size: int) -> float:
    """Pixel spacing in mm, rounded so that the DICOM PixelSpacing is exact."""
    return round(fov / size, 4)


def _filter_variance(sigma_mm: float, spacing: float, shape: tuple[int, int]) -> float:
    """Variance of unit white noise after a unit-gain Gaussian filter (sigma in mm) on this grid."""
    fy = np.fft.fftfreq(shape[0], d=spacing)[:, None]
    fx = np.fft.fftfreq(shape[1], d=spacing)[None, :]
    gain = np.exp(-2 * np.pi**2 * sigma_mm**2 * (fy * fy + fx * fx))
    return float(np.mean(gain * gain))


def _form_image(
    clean: np.ndarray, rng: np.random.Generator, spacing: float, noise_hu: float, texture_hu: float
) -> np.ndarray:
    """Blur by the PSF and add correlated noise + texture, all in one pass through the FFT."""
    slices, height, width = clean.shape
    fy = np.fft.fftfreq(height, d=spacing)[:, None]
    fx = np.fft.rfftfreq(width, d=spacing)[None, :]
    f2 = (fy * fy + fx * fx).astype(np.float32)

    def gain(sigma: float) -> np.ndarray:
        return np.exp(np.float32(-2 * np.pi**2 * sigma**2) * f2)

    ref_shape = (DEFAULT_SIZE, DEFAULT_SIZE)
    spectrum = np.zeros_like(f2)
    for sigma_hu, corr in ((noise_hu, NOISE_CORRELATION_MM), (texture_hu, TEXTURE_CORRELATION_MM)):
        # per-pixel std is sigma_hu at the reference spacing, and behaves like the same noise
        # averaged over larger pixels elsewhere (see module docstring)
        ref_var = _filter_variance(corr, REFERENCE_SPACING_MM, ref_shape)
        spectrum += gain(corr) * np.float32(
            sigma_hu * REFERENCE_SPACING_MM / spacing / math.sqrt(ref_var)
        )
    # white noise drawn directly as its spectrum: E|W|^2 = pixels, as for the FFT of unit noise
    parts = rng.standard_normal((2, slices, *f2.shape), dtype=np.float32)
    white = (parts[0] + 1j * parts[1]) * np.float32(math.sqrt(height * width / 2))
    image = np.fft.rfft2(clean) * gain(PSF_SIGMA_MM) + white * spectrum
    return np.fft.irfft2(image, s=(height, width)).astype(np.float32)


def _uid(*parts: object) -> str:
    """Deterministic, valid UID: 2.25 + a name-based (SHA-1) UUID of what it names (PS3.5 B.2)."""
    return "2.25." + str(uuid.uuid5(UID_NAMESPACE, "/".join(map(str, parts))).int)


def patient_id(seed: int, index: int) -> str:
    """The PatientID of phantom `index` of `seed`."""
    return f"phantom-{seed}-{index:04d}"


def make_patient(
    seed: int,
    index: int,
    *,
    size: int = DEFAULT_SIZE,
    slices: int = DEFAULT_SLICES,
    has_lesions: bool = True,
    lesion_contrast_hu: tuple[float, float] = LESION_CONTRAST_HU,
    lesion_diameter_mm: tuple[float, float] = LESION_DIAMETER_MM,
    min_lesion_mm: float = MIN_VISIBLE_DIAMETER_MM,
) -> Patient:
    """Generate phantom `index` of `seed` in memory: HU volume, labels, masks, metadata.

    Lesions have diameters drawn from `lesion_diameter_mm` and |contrast| from
    `lesion_contrast_hu`; cross-sections narrower than `min_lesion_mm` are neither drawn nor
    labelled.
    """
    _check_args(
        size=size,
        slices=slices,
        seed=seed,
        index=index,
        contrast=lesion_contrast_hu,
        diameter=lesion_diameter_mm,
        min_lesion=min_lesion_mm,
    )
    streams = np.random.SeedSequence([seed, index]).spawn(4)
    anatomy_rng, lesion_rng, noise_rng, meta_rng = (np.random.default_rng(s) for s in streams)

    # geometry: body size, field of view (pixel spacing), slice thickness, scan range on the liver
    a = _uniform(anatomy_rng, BODY_HALF_WIDTH_MM)
    b = a * _uniform(anatomy_rng, BODY_AP_RATIO)
    fov = float(np.clip(2 * a * _uniform(anatomy_rng, FOV_MARGIN), *FOV_MM))
    thickness = float(anatomy_rng.choice(SLICE_THICKNESSES_MM))
    liver_length = _uniform(anatomy_rng, LIVER_LENGTH_MM)
    liver_top = round(anatomy_rng.uniform(-120.0, -60.0), 1)
    scan = slices * thickness
    lo, hi = LIVER_SCAN_RANGE
    room = (hi - lo) * liver_length - scan
    offset = lo * liver_length + (anatomy_rng.uniform(0, room) if room > 0 else room / 2)
    z = np.round(liver_top - offset - thickness * np.arange(slices), 3)
    u = ((liver_top - z) / liver_length).astype(np.float32)
    wobble = _uniform(anatomy_rng, BODY_Z_WOBBLE)
    phase, period = anatomy_rng.uniform(0, 2 * np.pi), anatomy_rng.uniform(150, 300)
    scale = (1 + wobble * np.sin(2 * np.pi * z / period + phase)).astype(np.float32)
    cx, cy = anatomy_rng.uniform(-8, 8), anatomy_rng.uniform(-10, 5)
    body = dict(
        u=u,
        cx=cx,
        cy=cy,
        a=a * scale,
        b=b * scale,
        back_y=cy + b * anatomy_rng.uniform(0.86, 0.95),
        liver_length=liver_length,
    )

    anatomy_state = copy.deepcopy(anatomy_rng)  # to draw the same anatomy on the planning grid
    canvas = _new_canvas(fov, size, z)
    liver = _draw_anatomy(canvas, anatomy_rng, body)
    count, specs = 0, []
    if has_lesions:
        count = min(MAX_LESIONS, 1 + int(lesion_rng.poisson(scan / LESION_SCAN_MM_PER_LESION)))
        # lesions are planned on a fixed grid, so every image size gets the same lesions
        plan = canvas
        if size != LESION_PLANNING_SIZE:
            plan = _new_canvas(fov, LESION_PLANNING_SIZE, z)
            liver = _draw_anatomy(plan, anatomy_state, body)
        specs = _plan_lesions(
            plan,
            lesion_rng,
            liver,
            count,
            thickness,
            lesion_contrast_hu,
            lesion_diameter_mm,
            min_lesion_mm,
        )
    lesions, lesion_mask = _draw_lesions(canvas, specs, liver["liver_hu"], min_lesion_mm)

    noise = (
        NOISE_HU[0]
        + (NOISE_HU[1] - NOISE_HU[0])
        * (a - BODY_HALF_WIDTH_MM[0])
        / (BODY_HALF_WIDTH_MM[1] - BODY_HALF_WIDTH_MM[0])
        + noise_rng.uniform(-1.5, 1.5)
    )
    texture = _uniform(noise_rng, TEXTURE_HU)
    noise_hu = float(np.clip(noise, *NOISE_HU))
    image = _form_image(canvas.hu, noise_rng, canvas.spacing, noise_hu, texture)
    hu = np.clip(np.rint(image), HU_MIN, HU_MAX).astype(np.int16)

    study_date = datetime.date(STUDY_YEARS[0], 1, 1) + datetime.timedelta(
        days=int(meta_rng.integers(0, 365 * (STUDY_YEARS[1] - STUDY_YEARS[0])))
    )
    age = int(meta_rng.integers(*AGE_YEARS))
    birth_date = study_date.replace(year=study_date.year - age, day=1) - datetime.timedelta(
        days=int(meta_rng.integers(0, 365))
    )
    pid = patient_id(seed, index)
    meta = SeriesMeta(
        patient_id=pid,
        patient_name=f"Phantom^S{seed}^P{index}",
        sex="F" if meta_rng.random() < 0.5 else "M",
        birth_date=birth_date,
        study_date=study_date,
        study_time=f"{int(meta_rng.integers(7, 20)):02d}{int(meta_rng.integers(0, 60)):02d}"
        f"{int(meta_rng.integers(0, 60)):02d}",
        accession_number=f"PH{seed % 10**6:06d}{index:04d}"[:16],
        study_uid=_uid(seed, index, "study"),
        series_uid=_uid(seed, index, "series", CT_SERIES_NUMBER),
        frame_of_reference_uid=_uid(seed, index, "frame-of-reference"),
        sop_uids=tuple(_uid(seed, index, "image", s) for s in range(slices)),
        pixel_spacing_mm=_pixel_spacing(fov, size),
        slice_thickness_mm=thickness,
        origin_mm=(float(canvas.x[0]), float(canvas.y[0])),
        z_mm=tuple(float(v) for v in z),
    )
    return Patient(
        hu=hu,
        labels=lesion_mask.any(axis=(1, 2)).astype(np.int64),
        lesion_mask=lesion_mask,
        liver_mask=_liver_mask(canvas.tissue),
        lesions=tuple(lesions),
        meta=meta,
    )


def lesion_patients(patients: int, seed: int, fraction: float) -> np.ndarray:
    """Bool (patients,): which patients of `seed` get lesions; both kinds when patients >= 2."""
    count = math.floor(patients * fraction + 0.5)
    if patients >= 2 and 0 < fraction < 1:
        count = min(max(count, 1), patients - 1)
    flags = np.zeros(patients, bool)
    flags[np.random.default_rng([seed, patients]).permutation(patients)[:count]] = True
    return flags


def _ds(value: float) -> float:
    """A float that fits a DICOM DS (16 characters)."""
    return round(float(value), 4)


def _base_dataset(meta: SeriesMeta, sop_class: str, sop_uid: str, index: int) -> Dataset:
    """Patient, study, frame-of-reference and plane modules shared by images and masks."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    date = meta.study_date.strftime("%Y%m%d")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = meta.study_time
    ds.AccessionNumber = meta.accession_number
    ds.Manufacturer = "liverjax"
    ds.ManufacturerModelName = "tfds_liver.phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT ABDOMEN (synthetic phantom)"
    ds.PatientName = meta.patient_name
    ds.PatientID = meta.patient_id
    ds.PatientBirthDate = meta.birth_date.strftime("%Y%m%d")
    ds.PatientSex = meta.sex
    age = (meta.study_date - meta.birth_date).days // 365
    ds.PatientAge = f"{age:03d}Y"
    ds.BodyPartExamined = "ABDOMEN"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = meta.study_uid
    ds.StudyID = "1"
    ds.InstanceNumber = index + 1
    ds.FrameOfReferenceUID = meta.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient = [
        _ds(meta.origin_mm[0]),
        _ds(meta.origin_mm[1]),
        _ds(meta.z_mm[index]),
    ]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness = _ds(meta.slice_thickness_mm)
    ds.SliceLocation = _ds(meta.z_mm[index])
    ds.PixelSpacing = [_ds(meta.pixel_spacing_mm), _ds(meta.pixel_spacing_mm)]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    return ds


def _ct_dataset(patient: Patient, index: int) -> Dataset:
    """The CT Image Storage object of slice `index`."""
    meta = patient.meta
    ds = _base_dataset(meta, CTImageStorage, meta.sop_uids[index], index)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Modality = "CT"
    ds.SeriesDescription = f"Axial {meta.slice_thickness_mm:g} mm"
    ds.SeriesInstanceUID = meta.series_uid
    ds.SeriesNumber = CT_SERIES_NUMBER
    ds.AcquisitionNumber = 1
    ds.KVP = KVP
    ds.Rows, ds.Columns = patient.hu.shape[1:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = BITS_ALLOCATED, BITS_STORED, BITS_STORED - 1
    ds.WindowCenter, ds.WindowWidth = WINDOW_CENTER, WINDOW_WIDTH
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = RESCALE_INTERCEPT, RESCALE_SLOPE, "HU"
    stored = patient.hu[index].astype(np.int32) - RESCALE_INTERCEPT
    ds.PixelData = stored.astype("<u2").tobytes()
    return ds


def _mask_dataset(patient: Patient, index: int, kind: str, mask: np.ndarray) -> Dataset:
    """A Secondary Capture mask slice (0/255) on the image's grid, referencing the image."""
    meta = patient.meta
    number = LESION_MASK_SERIES_NUMBER if kind == LESION_MASK_DIR else LIVER_MASK_SERIES_NUMBER
    ds = _base_dataset(meta, SecondaryCaptureImageStorage, _uid(meta.sop_uids[index], kind), index)
    ds.ImageType = ["DERIVED", "SECONDARY", "MASK"]
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesDescription = f"{kind.removeprefix('masks_')} mask"
    ds.SeriesInstanceUID = _uid(meta.series_uid, kind)
    ds.SeriesNumber = number
    ds.DerivationDescription = "ground truth of the synthetic phantom"
    reference = Dataset()
    reference.ReferencedSOPClassUID = CTImageStorage
    reference.ReferencedSOPInstanceUID = meta.sop_uids[index]
    ds.ReferencedImageSequence = DicomSequence([reference])
    ds.Rows, ds.Columns = mask.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = (mask.astype(np.uint8) * MASK_ON).tobytes()
    return ds


def _file_name(index: int, slices: int) -> str:
    return f"{index + 1:0{max(3, len(str(slices)))}d}.dcm"


def write_patient(
    patient: Patient,
    out_dir: str | pathlib.Path,
    *,
    write_masks: bool = False,
    source: str = SOURCE,
) -> list[dict[str, str]]:
    """Write one phantom's series under out_dir/<patient_id>/; returns its labels.csv rows."""
    out_dir = pathlib.Path(out_dir)
    meta = patient.meta
    slices = patient.hu.shape[0]
    series_dirs = [IMAGE_SERIES_DIR] + ([LESION_MASK_DIR, LIVER_MASK_DIR] if write_masks else [])
    for name in series_dirs:
        (out_dir / meta.patient_id / name).mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(slices):
        rel = pathlib.PurePosixPath(meta.patient_id, IMAGE_SERIES_DIR, _file_name(index, slices))
        pydicom.dcmwrite(out_dir / rel, _ct_dataset(patient, index), enforce_file_format=True)
        if write_masks:
            for kind, mask in (
                (LESION_MASK_DIR, patient.lesion_mask),
                (LIVER_MASK_DIR, patient.liver_mask),
            ):
                path = out_dir / meta.patient_id / kind / _file_name(index, slices)
                pydicom.dcmwrite(
                    path, _mask_dataset(patient, index, kind, mask[index]), enforce_file_format=True
                )
        rows.append(
            dict(
                patient_id=meta.patient_id,
                label=labels.LABEL_NAMES[patient.labels[index]],
                path=str(rel),
                sex=meta.sex,
                exam_date=meta.study_date.isoformat(),
                source=source,
            )
        )
    return rows


def _check_args(**args: int | float | tuple[float, float]) -> None:
    """Raise ValueError naming the argument when a count, size or seed is out of range."""
    problems = []
    if "patients" in args and args["patients"] < 1:
        problems.append(f"patients={args['patients']}: need at least 1")
    if "size" in args and args["size"] < MIN_SIZE:
        problems.append(f"size={args['size']}: need at least {MIN_SIZE} pixels")
    if "slices" in args and args["slices"] < 1:
        problems.append(f"slices={args['slices']}: need at least 1")
    if "index" in args and args["index"] < 0:
        problems.append(f"index={args['index']}: use a non-negative integer")
    if "seed" in args and args["seed"] < 0:
        problems.append(f"seed={args['seed']}: use a non-negative integer")
    if "fraction" in args and not 0 <= args["fraction"] <= 1:
        problems.append(f"lesion_patient_fraction={args['fraction']}: use a value in [0, 1]")
    if "contrast" in args:
        low, high = args["contrast"]
        if not 0 < low <= high:
            problems.append(
                f"lesion_contrast_hu={args['contrast']}: give (low, high) HU with 0 < low <= high"
            )
    if "diameter" in args:
        low, high = args["diameter"]
        if not 0 < low <= high:
            problems.append(
                f"lesion_diameter_mm={args['diameter']}: give (low, high) mm with 0 < low <= high"
            )
    if "min_lesion" in args and not args["min_lesion"] > 0:
        problems.append(f"min_lesion_mm={args['min_lesion']}: use a positive number of mm")
    if "diameter" in args and "min_lesion" in args and args["min_lesion"] > args["diameter"][1]:
        problems.append(
            f"min_lesion_mm={args['min_lesion']} exceeds the largest lesion diameter "
            f"{args['diameter'][1]} mm: no lesion could be drawn"
        )
    if problems:
        raise ValueError("phantom: " + "; ".join(problems))


def write_phantom(
    out_dir: str | pathlib.Path,
    *,
    patients: int,
    seed: int,
    size: int = DEFAULT_SIZE,
    slices: int = DEFAULT_SLICES,
    lesion_patient_fraction: float = DEFAULT_LESION_PATIENT_FRACTION,
    lesion_contrast_hu: tuple[float, float] = LESION_CONTRAST_HU,
    lesion_diameter_mm: tuple[float, float] = LESION_DIAMETER_MM,
    min_lesion_mm: float = MIN_VISIBLE_DIAMETER_MM,
    write_masks: bool = False,
) -> pathlib.Path:
    """Write `patients` phantom CT series and labels.csv into an empty out_dir; returns the CSV."""
    _check_args(
        patients=patients,
        seed=seed,
        size=size,
        slices=slices,
        fraction=lesion_patient_fraction,
        contrast=lesion_contrast_hu,
        diameter=lesion_diameter_mm,
        min_lesion=min_lesion_mm,
    )
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(
            f"{out_dir}: phantom output folder is not empty; give a new or empty "
            "folder so that labels.csv lists exactly the files in it"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    for index, has_lesions in enumerate(lesion_patients(patients, seed, lesion_patient_fraction)):
        patient = make_patient(
            seed,
            index,
            size=size,
            slices=slices,
            has_lesions=bool(has_lesions),
            lesion_contrast_hu=lesion_contrast_hu,
            lesion_diameter_mm=lesion_diameter_mm,
            min_lesion_mm=min_lesion_mm,
        )
        rows += write_patient(patient, out_dir, write_masks=write_masks)
    csv_path = out_dir / "labels.csv"
    labels.write_labels(rows, csv_path)
    return csv_path


def summarize(csv_path: str | pathlib.Path) -> str:
    """One line: patients, slices and lesion share of a phantom labels.csv."""
    rows = labels.read_labels(csv_path)
    lesion = sum(r.label for r in rows)
    sick = {r.patient_id for r in rows if r.label}
    return (
        f"{len({r.patient_id for r in rows})} patients ({len(sick)} with lesions), "
        f"{len(rows)} slices ({lesion} lesion = {lesion / max(len(rows), 1):.0%}) -> {csv_path}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: write a phantom DICOM set and print a one-line summary."""
    parser = argparse.ArgumentParser(
        prog="python -m tfds_liver.phantom", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", required=True, help="empty or new output folder")
    parser.add_argument("--patients", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument(
        "--size", type=int, default=DEFAULT_SIZE, help="rows = columns (default %(default)s)"
    )
    parser.add_argument(
        "--slices", type=int, default=DEFAULT_SLICES, help="slices per series (default %(default)s)"
    )
    parser.add_argument(
        "--lesion-fraction",
        type=float,
        default=DEFAULT_LESION_PATIENT_FRACTION,
        help="share of patients with lesions (default %(default)s)",
    )
    parser.add_argument(
        "--lesion-contrast",
        type=float,
        nargs=2,
        default=LESION_CONTRAST_HU,
        metavar=("LOW", "HIGH"),
        help="|lesion - liver| in HU, drawn uniformly, hypo or hyper at random "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--lesion-diameter",
        type=float,
        nargs=2,
        default=LESION_DIAMETER_MM,
        metavar=("LOW", "HIGH"),
        help="lesion diameter in mm, drawn uniformly (default %(default)s)",
    )
    parser.add_argument(
        "--min-lesion",
        type=float,
        default=MIN_VISIBLE_DIAMETER_MM,
        metavar="MM",
        help="narrower lesion cross-sections are neither drawn nor labelled (default %(default)s)",
    )
    parser.add_argument(
        "--masks",
        action="store_true",
        help="also write lesion and liver mask series (not listed in labels.csv)",
    )
    args = parser.parse_args(argv)
    try:
        csv_path = write_phantom(
            args.out,
            patients=args.patients,
            seed=args.seed,
            size=args.size,
            slices=args.slices,
            lesion_patient_fraction=args.lesion_fraction,
            lesion_contrast_hu=tuple(args.lesion_contrast),
            lesion_diameter_mm=tuple(args.lesion_diameter),
            min_lesion_mm=args.min_lesion,
            write_masks=args.masks,
        )
    except (ValueError, FileExistsError) as error:
        message = str(error)
        for keyword, flag in _FLAGS_OF_KEYWORDS.items():  # _check_args's problems, by flag
            message = re.sub(rf"(phantom: |; ){keyword}=", rf"\1--{flag} ", message)
        parser.error(message)
    print("wrote " + summarize(csv_path))


# write_phantom's keyword arguments (in its errors) -> the command line's flags
_FLAGS_OF_KEYWORDS = {
    "lesion_patient_fraction": "lesion-fraction",
    "lesion_contrast_hu": "lesion-contrast",
    "lesion_diameter_mm": "lesion-diameter",
    "min_lesion_mm": "min-lesion",
    "patients": "patients",
    "size": "size",
    "slices": "slices",
    "seed": "seed",
}


if __name__ == "__main__":
    main()
