"""The demo cohort: synthetic brain MRI for a public set and for N hospital sites.

Every subject is the MNI152 template (nilearn's bundled T1, grey- and white-matter maps and
brain mask) moved to a small isotropic grid, aged, and deformed; every cohort then gets its
own scanner look. What each step does:

* **Tissue fractions.** On the target grid (``size``^3 voxels of ``192/size`` mm, centred on
  the brain) each voxel holds fractions of background, CSF, grey and white matter that sum
  to 1: ``gm = GM * mask``, ``wm = WM * mask``, ``csf = mask - gm - wm`` (what the brain mask
  holds that is neither grey nor white matter: ventricles and sulci), ``background = 1 - mask``.
  The label is the class with the largest fraction (0 background, 1 CSF, 2 grey matter,
  3 white matter).
* **Atrophy with age.** Parenchyma (grey + white matter) is eroded by ``2 mm * (age-20)/70``
  (fractional erosion with scipy's grey erosion, so sub-voxel amounts count), and what it
  loses becomes CSF: ventricles and sulci widen with age inside an unchanged skull.
* **Anatomy image.** ``sum_k fraction_k * template_mean_k + residual``, where the template's
  tissue means are fitted by least squares and the residual is the template detail they do
  not explain; an unaged subject reproduces the template T1.
* **Subject deformation.** MONAI's ``Rand3DElasticd`` (seeded per subject): a smooth elastic
  field (about 2 mm displacement, 18-24 mm smoothness) plus a small affine (rotation up to
  3.4 degrees about each axis, per-axis scale +-3 %, translation up to 3 mm), applied with
  linear interpolation to the anatomy image and to the tissue fractions alike; the label is the
  class with the largest deformed fraction, so label and image agree voxel by voxel (deforming
  the argmax map by nearest neighbour instead, the format-1 cohorts, disagreed with it at Dice
  0.74 and capped a segmenter's held-out Dice near 0.69). Heads are scaled to 92 % (sex 0) or 95 % (sex 1) of the template on
  average, so sex has a size effect (male heads are on average larger) and rotated heads
  stay inside the field of view.
  A follow-up scan reuses the subject's deformation at an older age with a new noise draw.
* **Scanner look** (one per cohort): a contrast curve (the template's tissue means mapped to
  the look's CSF/GM/WM intensities, then a gamma), a gain, a fixed multiplicative bias field
  (MONAI ``RandBiasField`` with the look's seed) and Rician noise (MONAI ``RandRicianNoise``).
  Gammas are stratified over the looks so that no two cohorts share a contrast.

Randomness comes from ``numpy.random.SeedSequence(seed, spawn_key=(purpose, cohort,
patient))``, so one subject never depends on the order or number of others, and the public
cohort and the sites never share a subject. Output is deterministic for a seed: nibabel
writes gzip with mtime 0, and rendering runs torch single-threaded, so the files are
byte-identical whatever the core count (on the same library versions).

torch, MONAI and nilearn are imported inside the functions that use them, so importing this
module (for :class:`CohortError`) stays cheap.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import math
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np

log = logging.getLogger(__name__)

# Bumped whenever the same arguments would produce different files.
COHORT_FORMAT = 2                 # 2: labels from the deformed fractions
LABEL_NAMES = ("background", "csf", "grey_matter", "white_matter")
MANIFEST_COLUMNS = ("patient_id", "image", "label", "age", "sex")
SUMMARY_FILE = "cohort.json"
PUBLIC = "public"
FIELD_OF_VIEW_MM = 192.0
AGE_RANGE = (20.0, 90.0)
FOLLOW_UP_FRACTION = 0.2
FOLLOW_UP_YEARS = (1.0, 5.0)
ATROPHY_MM_OVER_RANGE = 2.0       # parenchyma depth lost from age 20 to 90
ELASTIC_DISPLACEMENT_MM = 2.0     # rough standard deviation of the elastic displacement
ELASTIC_SMOOTHNESS_MM = (18.0, 24.0)
MAX_ROTATION_RAD = 0.06
MAX_SCALE_JITTER = 0.03           # per-axis scale spread around the head size
MAX_TRANSLATION_MM = 3.0
# Mean linear head size relative to the template, by sex (sex 1 about 3 % larger). Below 1,
# so that rotated, translated heads stay inside the 192 mm field of view (the template's
# brain is 178 mm front to back).
HEAD_SIZE_BY_SEX = (0.92, 0.95)
GAMMA_RANGE = (0.7, 1.4)

# SeedSequence spawn-key namespaces: what a stream is for.
_LOOK_STREAM, _SUBJECT_STREAM = 0, 1


class CohortError(ValueError):
    """A cohort request that cannot be carried out. One line naming the argument and the fix."""


@dataclass(frozen=True)
class CohortCounts:
    patients: int
    scans: int


@dataclass(frozen=True)
class CohortSummary:
    """What :func:`generate_cohort` wrote (or found already written, ``reused=True``)."""

    out: Path
    counts: dict[str, CohortCounts]   # "public", "site_0", ... -> patients and scans
    shape: tuple[int, int, int]
    spacing_mm: float
    seconds: float
    reused: bool

    def lines(self) -> list[str]:
        """A short human-readable report, one line per cohort."""
        verb = "already there (same arguments), nothing written" if self.reused else \
            f"written in {self.seconds:.1f} s"
        lines = [f"cohort {self.out}: {verb}",
                 f"  volumes {'x'.join(map(str, self.shape))} at {self.spacing_mm:g} mm, RAS; "
                 f"labels {', '.join(f'{i} {n}' for i, n in enumerate(LABEL_NAMES))}"]
        for name, c in self.counts.items():
            lines.append(f"  {name:<8} {c.patients:>4} patients {c.scans:>4} scans "
                         f"({c.scans - c.patients} follow-ups)")
        return lines


@dataclass(frozen=True)
class TemplateGrid:
    """The MNI152 template on the cohort's grid. Arrays are (S, S, S) in RAS voxel order."""

    fractions: np.ndarray       # (4, S, S, S) float32: background, CSF, GM, WM; sums to 1
    tissue_means: np.ndarray    # (4,) float32: template T1 intensity of each class
    residual: np.ndarray        # (S, S, S) float32: T1 detail the tissue means do not explain
    affine: np.ndarray          # (4, 4) float64, RAS, isotropic spacing
    spacing_mm: float


@dataclass(frozen=True)
class ScannerLook:
    """One cohort's scanner: contrast curve, gain, bias field and noise."""

    csf: float                  # relative intensities the template's tissue means map to
    grey_matter: float
    white_matter: float
    gamma: float
    gain: float                 # arbitrary scanner units
    bias_coefficient: float     # RandBiasField coefficients are drawn from +-this
    bias_seed: int
    noise: float                # Rician noise std, relative to the white-matter intensity


@dataclass(frozen=True)
class Visit:
    scan_id: str
    age: float                  # years, rounded to 0.1 as written in the manifest
    noise_seed: int


@dataclass(frozen=True)
class Subject:
    patient_id: str
    sex: int                    # 0 or 1
    deformation_seed: int
    visits: tuple[Visit, ...]   # baseline first, then an optional follow-up


# Argument bounds: one volume and its resampling must fit in memory, a run must end.
MAX_SIZE = 256
MAX_SITES = 100
MAX_PATIENTS = 10_000
MAX_SEED = 2**32 - 1


def _stream(seed: int, *key: int) -> np.random.Generator:
    """An independent random stream for (seed, purpose, cohort, [patient])."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _seed32(rng: np.random.Generator) -> int:
    """A seed for MONAI's RandomState (which needs < 2**32)."""
    return int(rng.integers(0, 2**32 - 1))


def validate_arguments(sites: int, patients: int, size: int, seed: int,
                       public_patients: int | None) -> None:
    """Raise :class:`CohortError` (one line) on the first argument that cannot work.

    Sizes are bounded so that one volume and its resampling fit in memory (checked before
    anything is allocated): at most :data:`MAX_SIZE` voxels per side.
    """
    if size < 16 or size % 8 or size > MAX_SIZE:
        memory = (f" ({size}^3 voxels need about {_volume_bytes(size) / 2**30:.3g} GiB per "
                  f"scan)" if size > MAX_SIZE else "")
        raise CohortError(f"--size {size}: not a usable grid{memory}; pass a multiple of 8 from "
                          f"16 to {MAX_SIZE} (the grid spans {FIELD_OF_VIEW_MM:g} mm)")
    if not 1 <= sites <= MAX_SITES:
        raise CohortError(f"--sites {sites}: out of range; pass 1..{MAX_SITES} sites")
    if not 2 <= patients <= MAX_PATIENTS:
        raise CohortError(f"--patients {patients}: out of range; pass 2..{MAX_PATIENTS} "
                          f"patients per site")
    if public_patients is not None and not 2 <= public_patients <= MAX_PATIENTS:
        raise CohortError(f"--public-patients {public_patients}: out of range; pass "
                          f"2..{MAX_PATIENTS} public patients (or leave it out to use --patients)")
    if not 0 <= seed <= MAX_SEED:
        raise CohortError(f"--seed {seed}: out of range; pass 0..{MAX_SEED}")



def _volume_bytes(size: int) -> int:
    """Working memory of one subject at ``size``^3: float32 image, 4 tissue fractions and the
    deformation field."""
    return size ** 3 * 4 * 9


@functools.lru_cache(maxsize=4)
def template_grid(size: int) -> TemplateGrid:
    """Resample nilearn's bundled MNI152 template to ``size``^3 voxels of ``192/size`` mm.

    The maps are smoothed before resampling (Gaussian of the FWHM a box average over the
    coarser voxel adds), so each coarse voxel holds partial-volume fractions, not aliased
    samples. The grid is centred on the brain mask's bounding box.
    """
    from nilearn import datasets, image

    spacing = FIELD_OF_VIEW_MM / size
    # The native 1 mm maps: nilearn makes its 2 mm ones by spline resampling, which is slower
    # than smoothing and resampling the 1 mm maps once here.
    t1 = datasets.load_mni152_template(resolution=1)
    maps = [t1, datasets.load_mni152_brain_mask(resolution=1),
            datasets.load_mni152_gm_template(resolution=1),
            datasets.load_mni152_wm_template(resolution=1)]
    source_mm = float(abs(t1.affine[0, 0]))
    mask_voxels = np.argwhere(np.asarray(maps[1].dataobj) > 0)
    centre_voxel = (mask_voxels.min(0) + mask_voxels.max(0)) / 2
    centre_mm = nib.affines.apply_affine(t1.affine, centre_voxel)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = centre_mm - spacing * (size - 1) / 2
    # A box of width w has variance w^2/12; the source voxel already is a box of source_mm.
    fwhm = math.sqrt(max(spacing**2 - source_mm**2, 0.0) / 12) * 2 * math.sqrt(2 * math.log(2))

    def on_grid(img) -> np.ndarray:
        img = image.new_img_like(img, np.asarray(img.dataobj, dtype=np.float32), copy_header=True)
        if fwhm > 0:
            img = image.smooth_img(img, fwhm)
        out = image.resample_img(img, target_affine=affine, target_shape=(size,) * 3,
                                 interpolation="linear", force_resample=True, copy_header=True)
        return np.clip(np.asarray(out.dataobj, dtype=np.float32), 0, None)

    t1_grid, mask, gm, wm = (on_grid(m) for m in maps)
    mask = np.clip(mask, 0, 1)
    gm, wm = gm * mask, wm * mask
    tissue = np.clip(gm + wm, 1e-12, None)
    overfull = np.maximum(tissue / np.clip(mask, 1e-12, None), 1.0)  # keep gm + wm <= mask
    gm, wm = gm / overfull, wm / overfull
    fractions = np.stack([1 - mask, mask - gm - wm, gm, wm]).astype(np.float32)
    fractions = np.clip(fractions, 0, 1)
    fractions /= fractions.sum(0, keepdims=True)
    design = fractions.reshape(4, -1).T
    tissue_means, *_ = np.linalg.lstsq(design, t1_grid.reshape(-1), rcond=None)
    residual = t1_grid - np.tensordot(tissue_means, fractions, axes=1)
    log.debug("template on %d^3 grid: tissue means %s", size, np.round(tissue_means, 3))
    return TemplateGrid(fractions=fractions, tissue_means=tissue_means.astype(np.float32),
                        residual=residual.astype(np.float32), affine=affine, spacing_mm=spacing)


def draw_looks(seed: int, sites: int) -> dict[str, ScannerLook]:
    """One scanner look per cohort ("public", "site_0", ...), gammas stratified so all differ."""
    names = [PUBLIC] + [f"site_{k}" for k in range(sites)]
    strata = _stream(seed, _LOOK_STREAM).permutation(len(names))
    low, high = GAMMA_RANGE
    width = (high - low) / len(names)
    looks = {}
    for index, name in enumerate(names):
        rng = _stream(seed, _LOOK_STREAM, index)
        looks[name] = ScannerLook(
            csf=float(rng.uniform(0.10, 0.30)),
            grey_matter=float(rng.uniform(0.45, 0.65)),
            white_matter=float(rng.uniform(0.80, 1.00)),
            gamma=float(low + width * (strata[index] + rng.uniform(0.15, 0.85))),
            gain=float(np.exp(rng.uniform(np.log(300), np.log(3000)))),
            bias_coefficient=float(rng.uniform(0.04, 0.10)),
            bias_seed=_seed32(rng),
            noise=float(rng.uniform(0.01, 0.05)))
    return looks


def draw_subjects(seed: int, cohort_index: int, prefix: str, patients: int) -> list[Subject]:
    """The cohort's patients: age, sex, deformation seed and visits (20 % have a follow-up)."""
    width = max(4, len(str(patients)))
    subjects = []
    for p in range(patients):
        rng = _stream(seed, _SUBJECT_STREAM, cohort_index, p)
        patient_id = f"{prefix}-{p + 1:0{width}d}"
        age = round(float(rng.uniform(*AGE_RANGE)), 1)
        sex = int(rng.integers(0, 2))
        deformation_seed = _seed32(rng)
        has_follow_up = rng.random() < FOLLOW_UP_FRACTION
        follow_up_age = round(age + float(rng.uniform(*FOLLOW_UP_YEARS)), 1)
        visits = [Visit(f"{patient_id}_v1", age, _seed32(rng))]
        noise_seed = _seed32(rng)
        if has_follow_up:
            visits.append(Visit(f"{patient_id}_v2", follow_up_age, noise_seed))
        subjects.append(Subject(patient_id, sex, deformation_seed, tuple(visits)))
    return subjects


def aged_fractions(grid: TemplateGrid, age: float) -> np.ndarray:
    """Tissue fractions (4, S, S, S) after age-related atrophy; lost parenchyma becomes CSF."""
    from scipy import ndimage

    depth = max(age - AGE_RANGE[0], 0.0) / (AGE_RANGE[1] - AGE_RANGE[0]) * ATROPHY_MM_OVER_RANGE
    steps = depth / grid.spacing_mm                      # erosion depth in voxels
    parenchyma = grid.fractions[2] + grid.fractions[3]
    footprint = ndimage.generate_binary_structure(3, 1)
    eroded = parenchyma
    for _ in range(int(steps)):
        eroded = ndimage.grey_erosion(eroded, footprint=footprint)
    partial = steps - int(steps)
    if partial > 0:
        deeper = ndimage.grey_erosion(eroded, footprint=footprint)
        eroded = (1 - partial) * eroded + partial * deeper
    keep = np.where(parenchyma > 1e-6, eroded / np.maximum(parenchyma, 1e-6), 1.0)
    background, csf, gm, wm = grid.fractions
    return np.stack([background, csf + parenchyma - eroded, gm * keep, wm * keep])


def _deformation(subject: Subject, spacing_mm: float):
    """MONAI's elastic + affine deformation, seeded by the subject (same for every visit)."""
    from monai.transforms import Rand3DElasticd

    low, high = ELASTIC_SMOOTHNESS_MM
    sigma = (low / spacing_mm, high / spacing_mm)       # voxels
    mean_sigma = sum(sigma) / 2
    # Smoothing uniform(-1, 1) noise (std 1/sqrt 3) with a 3D Gaussian of sigma s voxels
    # leaves a std of about (1/sqrt 3) / ((4 pi)^(3/4) s^(3/2)); scale back to the target.
    magnitude = (ELASTIC_DISPLACEMENT_MM / spacing_mm) * math.sqrt(3) \
        * (4 * math.pi) ** 0.75 * mean_sigma ** 1.5
    # MONAI scales the sampling grid by (1 + scale): the head appears 1 / (1 + scale) as large.
    centre = 1 / HEAD_SIZE_BY_SEX[subject.sex] - 1
    transform = Rand3DElasticd(
        keys=("image", "fractions"), sigma_range=sigma, magnitude_range=(magnitude, magnitude),
        prob=1.0, rotate_range=(MAX_ROTATION_RAD,) * 3,
        scale_range=((centre - MAX_SCALE_JITTER, centre + MAX_SCALE_JITTER),) * 3,
        translate_range=(MAX_TRANSLATION_MM / spacing_mm,) * 3,
        mode="bilinear", padding_mode="zeros")
    return transform.set_random_state(seed=subject.deformation_seed)


def _apply_look(anatomy, grid: TemplateGrid, look: ScannerLook, noise_seed: int) -> np.ndarray:
    """The scanner's view of an anatomy image: (1, S, S, S) -> float32 (S, S, S), scanner units."""
    from monai.transforms import RandBiasField, RandRicianNoise

    _, csf_mean, gm_mean, wm_mean = grid.tissue_means.tolist()
    knots_in = [0.0, csf_mean, gm_mean, wm_mean, 2 * wm_mean]
    knots_out = [0.0, look.csf, look.grey_matter, look.white_matter, 2 * look.white_matter]
    relative = np.interp(np.asarray(anatomy, dtype=np.float64), knots_in, knots_out)
    image = (np.clip(relative, 0, None) ** look.gamma * look.gain).astype(np.float32)
    bias = RandBiasField(degree=3, coeff_range=(-look.bias_coefficient, look.bias_coefficient),
                         prob=1.0).set_random_state(seed=look.bias_seed)
    image = bias(image)                                 # same field for every scan of a cohort
    noise_std = look.noise * look.gain * look.white_matter ** look.gamma
    noise = RandRicianNoise(prob=1.0, std=noise_std, relative=False, sample_std=False)
    image = noise.set_random_state(seed=noise_seed)(image)
    return np.asarray(image, dtype=np.float32)[0]


def render_scan(grid: TemplateGrid, subject: Subject, visit: Visit, look: ScannerLook
                ) -> tuple[np.ndarray, np.ndarray]:
    """One scan: image float32 (S, S, S) in scanner units and label uint8 (S, S, S) in 0..3."""
    import torch

    fractions = aged_fractions(grid, visit.age)
    anatomy = np.tensordot(grid.tissue_means, fractions, axes=1) + grid.residual
    deformed = _deformation(subject, grid.spacing_mm)({
        "image": torch.from_numpy(anatomy.astype(np.float32))[None],
        "fractions": torch.from_numpy(fractions.astype(np.float32))})
    image = _apply_look(deformed["image"].numpy(), grid, look, visit.noise_seed)
    # The label is read off the deformed fractions, the same interpolation as the image:
    # deforming the argmax map by nearest neighbour instead disagreed with it at Dice 0.74.
    label = deformed["fractions"].numpy().argmax(0).astype(np.uint8)
    return image, label


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write with a scanner-space qform and sform (code 1) and millimetre units."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header.set_data_dtype(array.dtype)
    nib.save(img, path)


def _cohort_plan(seed: int, sites: int, patients: int, public_patients: int
                 ) -> Iterator[tuple[str, list[Subject]]]:
    yield PUBLIC, draw_subjects(seed, 0, "pub", public_patients)
    for k in range(sites):
        yield f"site_{k}", draw_subjects(seed, k + 1, f"s{k}", patients)


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run torch single-threaded, then restore the caller's setting.

    The volumes are tiny, so one thread is faster than several; and torch's CPU convolution
    (MONAI's Gaussian smoothing of the elastic field) rounds differently with a different
    thread count, which would make the files depend on the machine's core count.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _write_cohorts(root: Path, grid: TemplateGrid, looks: dict[str, ScannerLook],
                   plan: list[tuple[str, list[Subject]]]) -> dict[str, CohortCounts]:
    from tqdm.auto import tqdm

    counts = {}
    total = sum(len(s.visits) for _, subjects in plan for s in subjects)
    with tqdm(total=total, desc="cohort", unit="scan", disable=None) as bar:
        for name, subjects in plan:
            folder = root / name
            (folder / "images").mkdir(parents=True)
            (folder / "labels").mkdir()
            rows = []
            for subject in subjects:
                for visit in subject.visits:
                    image, label = render_scan(grid, subject, visit, looks[name])
                    image_path = f"images/{visit.scan_id}.nii.gz"
                    label_path = f"labels/{visit.scan_id}_label.nii.gz"
                    _write_nifti(folder / image_path, image, grid.affine)
                    _write_nifti(folder / label_path, label, grid.affine)
                    rows.append((subject.patient_id, image_path, label_path,
                                 f"{visit.age:.1f}", str(subject.sex)))
                    bar.update()
            with (folder / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle, lineterminator="\n")
                writer.writerow(MANIFEST_COLUMNS)
                writer.writerows(rows)
            counts[name] = CohortCounts(len(subjects), len(rows))
    return counts


def _arguments(sites: int, patients: int, size: int, seed: int, public_patients: int
               ) -> dict[str, int]:
    return {"sites": sites, "patients": patients, "size": size, "seed": seed,
            "public_patients": public_patients}


def _previous_cohort(out: Path) -> dict[str, Any] | None:
    """The summary of a complete earlier cohort at ``out``, or None if ``out`` is empty/absent.

    Raises :class:`CohortError` if ``out`` holds something else.
    """
    if not out.exists():
        return None
    if not out.is_dir():
        raise CohortError(f"--out {out}: exists and is a file; choose a folder path")
    if not any(out.iterdir()):
        return None
    try:
        summary = json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))
        folders = list(summary["counts"])
        arguments = summary["arguments"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CohortError(f"--out {out}: exists and is not a fedsynth cohort (no readable "
                          f"{SUMMARY_FILE}); choose a new or empty folder") from None
    if not all((out / name / "manifest.csv").is_file() for name in folders):
        raise CohortError(f"--out {out}: the cohort there is incomplete (a manifest is missing); "
                          f"rerun with --force to replace it")
    return {"arguments": arguments, "format": summary.get("format"), "counts": summary["counts"]}


def _replace_folder(new: Path, out: Path) -> None:
    """Put ``new`` at ``out``; an old ``out`` is moved aside first and removed after."""
    if not out.exists():
        new.rename(out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old)


def generate_cohort(out: Path, sites: int, patients: int, size: int, seed: int,
                    public_patients: int | None = None, force: bool = False) -> CohortSummary:
    """Write the public cohort and one cohort per site under ``out`` (see the module docstring).

    Layout: ``out/{public,site_0,...}/manifest.csv`` (columns patient_id, image, label, age,
    sex; paths relative to the cohort folder), ``images/<scan>.nii.gz`` (float32 (S, S, S))
    and ``labels/<scan>_label.nii.gz`` (uint8 (S, S, S) in 0..3), plus ``out/cohort.json``.
    Everything is written to a temporary folder next to ``out`` and renamed at the end.
    If ``out`` already holds a cohort made with the same arguments, nothing is written
    (``reused=True``); one made with other arguments is replaced only with ``force``.
    """
    out = Path(out).expanduser().absolute()
    public_patients = patients if public_patients is None else public_patients
    validate_arguments(sites, patients, size, seed, public_patients)
    arguments = _arguments(sites, patients, size, seed, public_patients)
    spacing = FIELD_OF_VIEW_MM / size
    shape = (size, size, size)
    previous = _previous_cohort(out)
    if previous is not None and previous["arguments"] == arguments \
            and previous["format"] == COHORT_FORMAT and not force:
        counts = {name: CohortCounts(**c) for name, c in previous["counts"].items()}
        return CohortSummary(out, counts, shape, spacing, 0.0, reused=True)
    if previous is not None and not force:
        differing = ", ".join(f"{k}={previous['arguments'].get(k)} (now {v})"
                              for k, v in arguments.items() if previous["arguments"].get(k) != v)
        raise CohortError(f"--out {out}: holds a cohort made with other arguments "
                          f"({differing or 'an older cohort format'}); pass --force to replace "
                          f"it or choose another --out")
    if out.parent.exists() and not out.parent.is_dir():
        raise CohortError(f"--out {out}: its parent {out.parent} is a file; choose a folder path")
    started = time.perf_counter()
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir(parents=True)
    except OSError as err:
        raise CohortError(f"--out {out}: cannot write next to it ({err.strerror}); "
                          f"choose a folder you can write to") from None
    try:
        grid = template_grid(size)
        looks = draw_looks(seed, sites)
        plan = list(_cohort_plan(seed, sites, patients, public_patients))
        with _one_torch_thread():
            counts = _write_cohorts(staging, grid, looks, plan)
        from experiments.cli import fedsynth_version

        summary = {"format": COHORT_FORMAT, "fedsynth_version": fedsynth_version(),
                   "arguments": arguments,
                   "counts": {name: {"patients": c.patients, "scans": c.scans}
                              for name, c in counts.items()},
                   "shape": list(shape), "spacing_mm": spacing,
                   "labels": {str(i): n for i, n in enumerate(LABEL_NAMES)},
                   "manifest_columns": list(MANIFEST_COLUMNS),
                   "template": "nilearn MNI152 (T1, GM, WM, brain mask)"}
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        _replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.perf_counter() - started
    log.debug("cohort written to %s in %.1f s", out, seconds)
    return CohortSummary(out, counts, shape, spacing, seconds, reused=False)


HOLDOUT_FILE = "holdout.json"


def generate_holdout(cohort: Path, out: Path, patients_per_site: int) -> Path:
    """Held-out patients of every site of ``cohort``, pooled in one site-format folder ``out``.

    They come from the same generator as the cohort's sites (same seed, same scanner look per
    site) but are patients the sites never had: subjects ``patients .. patients + k - 1`` of each
    site's subject stream (:func:`draw_subjects` draws each subject independently of the count).
    ``out/site_<k>/`` holds each site's scans; ``out/manifest.csv`` lists them all (paths
    ``site_<k>/images/...``). A sweep measures quality against this folder: a research-only
    reference that no site trained on. Reused when it already holds the same arguments; written
    atomically otherwise. Returns ``out``.
    """
    cohort, out = Path(cohort).absolute(), Path(out).absolute()
    previous = _previous_cohort(cohort)
    if previous is None:
        raise CohortError(f"{cohort}: no demo cohort there; generate it first (fedsynth cohort)")
    if patients_per_site < 1:
        raise CohortError(f"holdout patients per site: must be >= 1 (got {patients_per_site})")
    arguments = {**previous["arguments"], "holdout_patients_per_site": patients_per_site}
    try:
        if json.loads((out / HOLDOUT_FILE).read_text())["arguments"] == arguments:
            return out
    except (OSError, ValueError, KeyError, TypeError):
        pass
    seed, sites, trained = arguments["seed"], arguments["sites"], arguments["patients"]
    plan = [(f"site_{k}",
             draw_subjects(seed, k + 1, f"s{k}", trained + patients_per_site)[trained:])
            for k in range(sites)]
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        with _one_torch_thread():
            counts = _write_cohorts(staging, template_grid(arguments["size"]),
                                    draw_looks(seed, sites), plan)
        with (staging / "manifest.csv").open("w", newline="", encoding="utf-8") as pooled:
            writer = csv.writer(pooled, lineterminator="\n")
            writer.writerow(MANIFEST_COLUMNS)
            for name, _ in plan:
                with (staging / name / "manifest.csv").open(newline="", encoding="utf-8") as rows:
                    reader = csv.reader(rows)
                    next(reader)
                    for row in reader:
                        writer.writerow([row[0], f"{name}/{row[1]}", f"{name}/{row[2]}", *row[3:]])
        summary = {"format": COHORT_FORMAT, "arguments": arguments,
                   "counts": {n: {"patients": c.patients, "scans": c.scans}
                              for n, c in counts.items()}}
        (staging / HOLDOUT_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        _replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
