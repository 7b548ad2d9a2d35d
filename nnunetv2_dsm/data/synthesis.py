"""Synthetic tumours in real CT, following label-free liver tumour synthesis (Hu et al., CVPR 2023).

A lesion is a randomly rotated ellipsoid whose surface is deformed by smoothed noise (an elastic
perturbation of the radius), filled with a texture of smoothed Gaussian noise around an
attenuation shifted from the organ's median HU (negative: hypodense, positive: hyperdense), and
blended into the image through an optionally blurred edge. Lesions are placed entirely inside the
organ mask eroded by ``erosion_mm``, never overlap, and intensities change only inside the organ.
Everything random comes from the caller's ``numpy.random.Generator``: same seed, same lesions.

:func:`build_tumour_benchmark` turns real CT with TotalSegmentator ``total`` labels into an nnU-Net
raw dataset for zero-shot tumour segmentation: training cases carry the seen tumour types
(default liver and kidney tumours), the test split (``imagesTs``/``labelsTs``) carries unseen types
(default pancreas and spleen tumours) that no training case shows.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from nnunetv2_dsm.data.raw_dataset import (
    Geometry,
    assign_ids,
    case_paths,
    dsm_dataset_json,
    label_dtype,
    read_array,
    staged_dataset,
    write_array,
    write_json_atomic,
)
from nnunetv2_dsm.data.totalseg_names import TOTALSEG_TO_CANONICAL, TOTALSEG_TOTAL_IDS
from nnunetv2_dsm.vocabulary import ORGANS, TUMOUR_PARENTS, check_canonical, is_tumour


@dataclass(frozen=True)
class LesionConfig:
    """Lesion appearance; sizes in mm, intensities in HU."""

    # Equivalent-sphere diameter (6 V / pi)^(1/3) of each lesion, measured on the voxel grid.
    diameter_mm: tuple[float, float] = (10.0, 30.0)
    count: tuple[int, int] = (1, 3)
    # Lesion mean minus the organ's median HU.
    attenuation_hu: tuple[float, float] = (-60.0, -20.0)
    texture_std_hu: float = 8.0
    texture_sigma_mm: float = 1.5
    # Semi-axes are drawn from [1 - elongation, 1 + elongation] times the radius.
    elongation: float = 0.25
    # Amplitude of the radial noise deformation, as a fraction of the radius.
    deformation: float = 0.2
    deformation_sigma_mm: float = 4.0
    edge_blur_mm: float = 1.0
    erosion_mm: float = 3.0
    max_tries: int = 200

    def __post_init__(self) -> None:
        lo, hi = self.diameter_mm
        if not 0 < lo <= hi:
            raise ValueError(f"diameter_mm must satisfy 0 < min <= max, got {self.diameter_mm}")
        if not 0 <= self.count[0] <= self.count[1]:
            raise ValueError(f"count must satisfy 0 <= min <= max, got {self.count}")
        if self.attenuation_hu[0] > self.attenuation_hu[1]:
            raise ValueError(f"attenuation_hu must be (min, max), got {self.attenuation_hu}")
        if not 0 <= self.elongation < 1 or not 0 <= self.deformation < 1:
            raise ValueError("elongation and deformation must lie in [0, 1)")
        if min(self.texture_std_hu, self.texture_sigma_mm, self.edge_blur_mm, self.erosion_mm) < 0:
            raise ValueError("texture, blur and erosion settings must be >= 0")


def _equivalent_diameter(voxels: int, spacing: np.ndarray) -> float:
    return (6.0 * voxels * float(np.prod(spacing)) / math.pi) ** (1.0 / 3.0)


def _lesion_shape(diameter: float, spacing: np.ndarray, rng: np.random.Generator, cfg: LesionConfig) -> np.ndarray:
    """Boolean patch of a rotated, noise-deformed ellipsoid centred in the patch."""
    radius = diameter / 2.0
    axes = 1.0 + rng.uniform(-cfg.elongation, cfg.elongation, 3)
    axes = radius * axes / np.prod(axes) ** (1.0 / 3.0)
    rotation, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    half = np.ceil((axes.max() * (1.0 + 2.0 * cfg.deformation) + spacing) / spacing).astype(int)
    grid = np.stack(
        np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing)], indexing="ij"), axis=-1
    )
    rho = np.linalg.norm((grid @ rotation) / axes, axis=-1)
    noise = ndimage.gaussian_filter(rng.standard_normal(rho.shape), cfg.deformation_sigma_mm / spacing)
    noise /= max(float(noise.std()), 1e-8)
    inside = rho < 1.0 + cfg.deformation * np.clip(noise, -2.0, 2.0)
    # Strong deformation can pinch off islands; the lesion is the largest connected piece.
    components, n = ndimage.label(inside)
    if n > 1:
        inside = components == 1 + int(np.argmax(ndimage.sum(inside, components, range(1, n + 1))))
    return ndimage.binary_fill_holes(inside)


def _texture(shape: tuple[int, ...], mean: float, spacing: np.ndarray, rng: np.random.Generator, cfg: LesionConfig):
    noise = rng.standard_normal(shape)
    if cfg.texture_sigma_mm > 0:
        noise = ndimage.gaussian_filter(noise, cfg.texture_sigma_mm / spacing)
    noise /= max(float(noise.std()), 1e-8)
    return mean + cfg.texture_std_hu * noise


def synthesize_lesions(
    image: np.ndarray,
    label: np.ndarray,
    organ_ids: Sequence[int],
    lesion_id: int,
    spacing: Sequence[float],
    rng: np.random.Generator,
    config: LesionConfig | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Insert lesions into the organ made of label values ``organ_ids``.

    ``image`` and ``label`` are 3-D arrays of the same shape; ``spacing`` is in mm per array axis
    (the same axis order as ``image.shape``, i.e. reversed SimpleITK spacing). Returns new arrays
    (inputs are not modified; the image keeps its dtype) and ``info`` with the organ reference HU,
    the requested count and per lesion its centre voxel, measured diameter, voxel count and HU shift.
    Fewer lesions than requested are placed when the eroded organ has no room left.
    """
    cfg = config or LesionConfig()
    if image.ndim != 3 or image.shape != label.shape:
        raise ValueError(f"image and label must be 3-D arrays of one shape, got {image.shape} and {label.shape}")
    spacing = np.asarray(spacing, dtype=float)
    if spacing.shape != (3,) or (spacing <= 0).any():
        raise ValueError(f"spacing must be three positive numbers (mm per array axis), got {spacing}")
    if lesion_id in organ_ids or lesion_id <= 0:
        raise ValueError(f"lesion_id {lesion_id} must be a positive label value outside organ_ids {list(organ_ids)}")
    organ_full = np.isin(label, organ_ids)
    if not organ_full.any():
        raise ValueError(f"no voxel carries the organ label values {list(organ_ids)}")

    # Work inside the organ's bounding box (plus room for the edge blur) to keep large CT cheap.
    margin = np.ceil(3.0 * cfg.edge_blur_mm / spacing).astype(int) + 1
    nz = np.argwhere(organ_full)
    lo = np.maximum(nz.min(0) - margin, 0)
    hi = np.minimum(nz.max(0) + margin + 1, image.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    organ = organ_full[box]
    work = image[box].astype(np.float64)
    original = work.copy()
    lesions = np.zeros(organ.shape, dtype=bool)
    room = ndimage.distance_transform_edt(organ, sampling=spacing) > cfg.erosion_mm

    reference = float(np.median(work[organ]))
    requested = int(rng.integers(cfg.count[0], cfg.count[1] + 1))
    placed = []
    for _ in range(requested):
        found = None
        for _ in range(cfg.max_tries):
            if not room.any():
                break
            shape = _lesion_shape(rng.uniform(*cfg.diameter_mm), spacing, rng, cfg)
            diameter = _equivalent_diameter(int(shape.sum()), spacing)
            if not cfg.diameter_mm[0] <= diameter <= cfg.diameter_mm[1]:
                continue
            centre = np.array(np.unravel_index(rng.choice(np.flatnonzero(room)), room.shape))
            start = centre - np.array(shape.shape) // 2
            stop = start + np.array(shape.shape)
            if (start < 0).any() or (stop > room.shape).any():
                continue
            region = tuple(slice(a, b) for a, b in zip(start, stop))
            if room[region][shape].all():
                found = (region, shape, centre, diameter)
                break
        if found is None:
            break
        region, shape, centre, diameter = found
        mask = np.zeros(organ.shape, dtype=bool)
        mask[region] = shape
        shift = float(rng.uniform(*cfg.attenuation_hu))
        alpha = ndimage.gaussian_filter(mask.astype(np.float64), cfg.edge_blur_mm / spacing) if cfg.edge_blur_mm else (
            mask.astype(np.float64)
        )
        alpha[~organ] = 0.0
        work = (1.0 - alpha) * work + alpha * _texture(organ.shape, reference + shift, spacing, rng, cfg)
        lesions |= mask
        # Keep the next lesion off this one: remove it and a one-voxel shell from the free room.
        room &= ~ndimage.binary_dilation(mask)
        placed.append(
            {
                "centre_voxel": [int(c) for c in centre + lo],
                "diameter_mm": round(diameter, 3),
                "voxels": int(shape.sum()),
                "attenuation_shift_hu": round(shift, 3),
            }
        )

    out_image = image.copy()
    changed = work if np.issubdtype(image.dtype, np.floating) else np.rint(work)
    # Voxels no lesion touched keep their exact original value (no float round trip).
    changed = np.where(work == original, original, changed)
    if np.issubdtype(image.dtype, np.integer):
        info_dtype = np.iinfo(image.dtype)
        changed = np.clip(changed, info_dtype.min, info_dtype.max)
    out_image[box] = changed.astype(image.dtype)
    out_label = label.copy()
    out_label[box][lesions] = lesion_id
    info = {"organ_reference_hu": round(reference, 3), "requested": requested, "lesions": placed}
    return out_image, out_label, info


# Appearance per tumour type on CT: hypodense liver, spleen and pancreas lesions, renal masses
# spanning hypo- to mildly hyperdense. Small organs get small lesions and a thinner safety margin.
DEFAULT_LESION_CONFIGS: dict[str, LesionConfig] = {
    "liver_tumor": LesionConfig(diameter_mm=(10.0, 30.0), count=(1, 3), attenuation_hu=(-70.0, -25.0)),
    "kidney_tumor": LesionConfig(diameter_mm=(8.0, 20.0), count=(1, 2), attenuation_hu=(-60.0, 30.0)),
    "pancreas_tumor": LesionConfig(
        diameter_mm=(6.0, 12.0), count=(1, 1), attenuation_hu=(-50.0, -20.0), erosion_mm=1.5
    ),
    "spleen_tumor": LesionConfig(diameter_mm=(8.0, 20.0), count=(1, 2), attenuation_hu=(-55.0, -20.0)),
}

# (case name, CT file, TotalSegmentator ``total`` segmentation) in the TotalSegmentator sdist.
EXAMPLE_CASES: tuple[tuple[str, str, str], ...] = (
    ("ct", "example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"),
    ("ctsm", "example_ct_sm.nii.gz", "example_seg.nii.gz"),
)


def totalseg_to_organ_labels(seg: np.ndarray, ids: Mapping[str, int]) -> np.ndarray:
    """TotalSegmentator ``total`` label map -> label map of the canonical organs in ``ids``."""
    lut = np.zeros(max(int(seg.max()), max(TOTALSEG_TOTAL_IDS)) + 1, dtype=np.int64)
    for ts_id, ts_name in TOTALSEG_TOTAL_IDS.items():
        name = TOTALSEG_TO_CANONICAL[ts_name]
        if name in ids and not is_tumour(name):
            lut[ts_id] = ids[name]
    return lut[seg.astype(np.int64)].astype(label_dtype(max(ids.values())))


def _organs_present(seg: np.ndarray) -> set[str]:
    present = set(np.unique(seg).tolist())
    return {
        TOTALSEG_TO_CANONICAL[n] for i, n in TOTALSEG_TOTAL_IDS.items() if i in present
    } & set(ORGANS)


@dataclass(frozen=True)
class RealCase:
    name: str
    ct: Path
    segmentation: Path


@dataclass
class _Loaded:
    case: RealCase
    image: np.ndarray
    seg: np.ndarray
    geometry: Geometry
    organs: set[str] = field(default_factory=set)


def example_cases(example_dir: Path) -> list[RealCase]:
    """The real example CT cases of the TotalSegmentator sdist (see :data:`EXAMPLE_CASES`)."""
    return [RealCase(n, Path(example_dir) / ct, Path(example_dir) / seg) for n, ct, seg in EXAMPLE_CASES]


def build_tumour_benchmark(
    out_dir: Path,
    cases: Sequence[RealCase],
    variants: int = 3,
    seed: int = 0,
    seen: Sequence[str] = ("liver_tumor", "kidney_tumor"),
    unseen: Sequence[str] = ("pancreas_tumor", "spleen_tumor"),
    configs: Mapping[str, LesionConfig] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an nnU-Net raw dataset: ``variants`` synthetic versions per real case with seen tumour
    types in ``imagesTr/labelsTr`` and ``variants`` with unseen types in ``imagesTs/labelsTs``.

    ``cases`` hold real CT with TotalSegmentator ``total`` labels. Training availability is the
    organs plus the seen tumours; unseen tumour classes are declared in the labels (the test split
    uses them) but annotated in no training case. Case ids: ``tsyn_{case}_{variant:02d}`` (train)
    and ``tsyn_{case}_test_{variant:02d}`` (test). Variant ``v`` of case ``i`` uses the generator
    seeded with ``(seed, i, split, v)``.
    """
    seen, unseen = list(seen), list(unseen)
    check_canonical(seen + unseen, "tumour benchmark")
    if set(seen) & set(unseen) or not all(is_tumour(t) for t in seen + unseen):
        raise ValueError(f"seen {seen} and unseen {unseen} must be disjoint lists of tumour classes")
    if variants < 1 or not cases:
        raise ValueError("need at least one real case and one variant")
    configs = {**DEFAULT_LESION_CONFIGS, **(configs or {})}
    missing = [t for t in seen + unseen if t not in configs]
    if missing:
        raise ValueError(f"no LesionConfig for {missing}; pass configs={{name: LesionConfig(...)}}")

    loaded = []
    for case in cases:
        for f in (case.ct, case.segmentation):
            if not Path(f).is_file():
                raise FileNotFoundError(f"{f} not found (real case {case.name!r})")
        image, geometry = read_array(case.ct)
        seg, _ = read_array(case.segmentation)
        if seg.shape != image.shape:
            raise ValueError(f"{case.segmentation}: shape {seg.shape} differs from {case.ct} {image.shape}")
        loaded.append(_Loaded(case, image, seg, geometry, _organs_present(seg)))
    organs = set().union(*(c.organs for c in loaded))
    for t in seen + unseen:
        if not organs & set(TUMOUR_PARENTS[t]):
            raise ValueError(f"no real case contains a parent organ {TUMOUR_PARENTS[t]} of {t}")
    ids = assign_ids(organs | set(seen) | set(unseen), "tumour benchmark")

    availability: dict[str, list[str]] = {}
    lesion_log: dict[str, dict[str, int]] = {}
    test_cases: list[str] = []
    jobs = [
        (i, c, split, v) for i, c in enumerate(loaded) for split in ("Tr", "Ts") for v in range(variants)
    ]
    out_dir = Path(out_dir)
    with staged_dataset(out_dir, overwrite=overwrite,
                        inputs=[f for c in loaded for f in (c.case.ct, c.case.segmentation)]) as stage:
        (stage / "imagesTs").mkdir()
        (stage / "labelsTs").mkdir()
        for i, c, split, v in tqdm(jobs, desc="tumour benchmark", unit="case"):
            rng = np.random.default_rng([seed, i, 0 if split == "Tr" else 1, v])
            image, label = c.image, totalseg_to_organ_labels(c.seg, ids)
            spacing = c.geometry.array_spacing
            log = {}
            for tumour in seen if split == "Tr" else unseen:
                organ_ids = [ids[p] for p in TUMOUR_PARENTS[tumour] if p in c.organs]
                if not organ_ids:
                    continue
                image, label, info = synthesize_lesions(
                    image, label, organ_ids, ids[tumour], spacing, rng, configs[tumour]
                )
                log[tumour] = len(info["lesions"])
            case_id = f"tsyn_{c.case.name}_{v:02d}" if split == "Tr" else f"tsyn_{c.case.name}_test_{v:02d}"
            image_dst, label_dst = case_paths(stage, case_id, split)
            write_array(image, c.geometry, image_dst)
            write_array(label, c.geometry, label_dst)
            lesion_log[case_id] = log
            if split == "Tr":
                availability[case_id] = [n for n in ids if n in c.organs or n in seen]
            else:
                test_cases.append(case_id)
        write_json_atomic(
            stage / "dataset.json",
            dsm_dataset_json(
                ids, len(availability), availability,
                {"tsyn": "TotalSegmentator example CT with synthetic tumours (Hu et al. 2023 style)"},
                out_dir.name,
                "Real CT with synthetic lesions: seen tumour types in imagesTr, unseen types in imagesTs.",
                extra_dsm={
                    "benchmark": {
                        "seen_tumours": seen,
                        "unseen_tumours": unseen,
                        "test_cases": test_cases,
                        "real_cases": {c.case.name: str(c.case.ct.name) for c in loaded},
                        "seed": seed,
                        "variants": variants,
                        "lesions_placed": lesion_log,
                    }
                },
            ),
        )
    return out_dir
