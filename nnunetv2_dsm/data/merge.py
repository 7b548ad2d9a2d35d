"""Merge several nnU-Net raw datasets into one DSM raw dataset with partial labels.

Each source is a raw dataset folder (``imagesTr``, ``labelsTr``, ``dataset.json``, or a
``dataset`` file list). Its label names are canonical DSM names, or are mapped with an explicit
rename table ``{source name: canonical name or None to drop the class}``. The merged vocabulary is
the union of the classes present, ids are assigned organs first (vocabulary order) then tumours,
every label map is remapped, and each case records the classes its source annotated
(``dataset.json["dsm"]["class_availability"]``). Case ids get a source prefix
(``msd09_spleen_001``); ``dataset.json["dsm"]["sources"]`` maps each prefix to its source.

Multi-parent tumours follow the rule documented in :mod:`nnunetv2_dsm.data.raw_dataset`: one id,
included in the region of every parent organ present.

Everything that can be checked without voxels (names, regions, prefixes, case ids, files) is
validated before anything is written; the dataset is then assembled in a staging folder and moved
into place, so a failure (e.g. an undeclared voxel value) leaves no partial output.
"""

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunetv2_dsm.data.raw_dataset import (
    FILE_ENDING,
    assign_ids,
    copy_image,
    dsm_dataset_json,
    read_array,
    remap_labels,
    staged_dataset,
    write_array,
    write_json_atomic,
)
from nnunetv2_dsm.errors import DSMError
from nnunetv2_dsm.vocabulary import CANONICAL, TUMOUR_PARENTS, check_canonical, is_tumour


class MergeError(DSMError, ValueError):
    pass


@dataclass(frozen=True)
class MergeSource:
    """One input dataset. ``prefix``: case-id prefix (default: the source's own ``dsm.sources``
    prefixes when its case ids carry them, else the lower-cased dataset name of the folder)."""

    path: Path
    prefix: str | None = None
    rename: Mapping[str, str | None] | None = None


@dataclass
class _SourceCase:
    source_id: str
    out_id: str
    images: list[Path]
    label: Path
    available: list[str]


@dataclass
class _SourcePlan:
    path: Path
    value_to_name: dict[int, str | None]
    ignore_value: int | None
    classes: set[str]
    sources: dict[str, str]
    cases: list[_SourceCase] = field(default_factory=list)


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise MergeError(f"{path} not found: every source must be an nnU-Net raw dataset folder with dataset.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MergeError(f"{path} is not valid JSON: {e}") from e


def _region_values(value: object, where: str) -> list[int]:
    values = value if isinstance(value, list | tuple) else [value]
    try:
        return [int(v) for v in values]
    except (TypeError, ValueError) as e:
        raise MergeError(f"{where}: label value {value!r} is neither an int nor a list of ints") from e


def _decode_labels(
    labels: Mapping[str, object], rename: Mapping[str, str | None] | None, where: str
) -> tuple[dict[int, str | None], int | None]:
    """Source voxel value -> canonical name (None: becomes background), and the ignore value.

    A value is owned by the smallest region containing it (nnU-Net region syntax: an organ region
    ``[1, 2]`` with a tumour ``2`` means value 1 is the organ, value 2 the tumour).
    """
    rename = dict(rename or {})
    stray = sorted(set(rename) - set(labels))
    if stray:
        raise MergeError(f"{where}: rename table names {stray}, which are not labels of this dataset ({list(labels)})")
    for src, dst in rename.items():
        if dst is not None and dst not in CANONICAL:
            check_canonical([dst], f"{where}: rename table entry {src!r} -> {dst!r}")

    def canonical(name: str) -> str | None:
        if name in rename:
            return rename[name]
        if name not in CANONICAL:
            raise MergeError(
                f"{where}: label {name!r} is not a canonical DSM class name; map it in a rename table "
                f"(e.g. {{{name!r}: 'liver'}}, or null to drop it) or rename it in dataset.json."
            )
        return name

    ignore_value = None
    regions: dict[str, list[int]] = {}
    for name, value in labels.items():
        if name == "background":
            if _region_values(value, where) != [0]:
                raise MergeError(f"{where}: background must be label 0, got {value!r}")
        elif name == "ignore":
            ignore_value = _region_values(value, where)[0]
        else:
            regions[name] = _region_values(value, f"{where}, label {name!r}")

    owner: dict[int, str] = {}
    for v in sorted({v for vals in regions.values() for v in vals}):
        containing = sorted((len(set(vals)), n) for n, vals in regions.items() if v in vals)
        if len(containing) > 1 and containing[0][0] == containing[1][0]:
            raise MergeError(
                f"{where}: value {v} is claimed by labels {containing[0][1]!r} and {containing[1][1]!r} alike; "
                "each voxel value needs one owner label (the smallest region containing it)."
            )
        owner[v] = containing[0][1]
    if 0 in owner:
        raise MergeError(f"{where}: label {owner[0]!r} uses value 0, which is background")

    value_to_name = {v: canonical(n) for v, n in owner.items()}
    for name, vals in regions.items():
        parent = canonical(name)
        for v in vals:
            child = value_to_name[v]
            if child == parent or child is None:
                continue
            if not (is_tumour(child) and parent in TUMOUR_PARENTS[child]):
                raise MergeError(
                    f"{where}: label {name!r} (-> {parent!r}) is the region {vals}, which includes value {v} "
                    f"(-> {child!r}); in DSM datasets only an organ contains its own tumours. Fix the region "
                    "in dataset.json or the rename table."
                )
    return value_to_name, ignore_value


_CASE_FILE = re.compile(r"(.+)_(\d{4})$")


def _training_cases(folder: Path, dataset_json: dict) -> dict[str, tuple[list[Path], Path]]:
    """case id -> (channel image files, label file). nnU-Net's own lister starts a 12-process pool,
    far too heavy for a file listing, so the same rule (``{case}_{XXXX}{ending}``) is applied here."""
    ending = dataset_json["file_ending"]
    if "dataset" in dataset_json:
        return {
            k: ([folder / p for p in v["images"]], folder / v["label"]) for k, v in dataset_json["dataset"].items()
        }
    images_dir = folder / "imagesTr"
    if not images_dir.is_dir():
        raise MergeError(f"{folder}: no imagesTr folder")
    cases: dict[str, list[Path]] = {}
    for f in sorted(images_dir.iterdir()):
        if f.name.startswith(".") or not f.name.endswith(ending):
            continue
        m = _CASE_FILE.match(f.name[: -len(ending)])
        if m is None:
            raise MergeError(f"{f}: image files must be named {{case}}_XXXX{ending} (channel index XXXX)")
        cases.setdefault(m.group(1), []).append(f)
    return {k: (v, folder / "labelsTr" / f"{k}{ending}") for k, v in cases.items()}


def _default_prefix(folder: Path) -> str:
    m = re.fullmatch(r"Dataset\d{3}_(.+)", folder.name)
    return re.sub(r"[^a-z0-9]+", "_", (m.group(1) if m else folder.name).lower()).strip("_")


def _plan_source(src: MergeSource) -> _SourcePlan:
    folder = Path(src.path)
    where = str(folder / "dataset.json")
    dj = _load_json(folder / "dataset.json")
    missing = [k for k in ("labels", "file_ending") if k not in dj]
    if missing:
        raise MergeError(f"{where}: missing required key(s) {missing}")
    channels = dj.get("channel_names", dj.get("modality", {}))
    if len(channels) != 1:
        raise MergeError(f"{where}: DSM datasets are single-channel CT; this source has channels {channels}")
    value_to_name, ignore_value = _decode_labels(dj["labels"], src.rename, where)
    classes = {n for n in value_to_name.values() if n is not None}
    if not classes:
        raise MergeError(f"{where}: no classes left after renaming")

    dsm = dj.get("dsm", {})
    own_sources: dict[str, str] = dict(dsm.get("sources", {}))
    cases = _training_cases(folder, dj)
    if not cases:
        raise MergeError(f"{folder}: no training cases found")

    def carries(prefixes: Sequence[str]) -> bool:
        return all(any(c.startswith(f"{p}_") for p in prefixes) for c in cases)

    if src.prefix is None and own_sources and carries(list(own_sources)):
        prefix, sources = None, own_sources
    else:
        prefix = src.prefix or _default_prefix(folder)
        if not re.fullmatch(r"[a-z0-9][a-z0-9_]*", prefix):
            raise MergeError(f"{folder}: case-id prefix {prefix!r} must be lower-case letters, digits and '_'")
        sources = {prefix: own_sources.get(prefix) or dj.get("name") or folder.name}

    availability = dsm.get("class_availability", {})
    plan = _SourcePlan(folder, value_to_name, ignore_value, classes, sources)
    rename = dict(src.rename or {})
    for case_id, (images, label) in sorted(cases.items()):
        if len(images) != 1:
            raise MergeError(f"{folder}: case {case_id} has {len(images)} channel files; expected one CT image")
        for f in [*images, label]:
            if not f.is_file():
                raise MergeError(f"{f} not found (case {case_id} of {folder})")
        if case_id in availability:
            names = [rename.get(n, n) for n in availability[case_id]]
            check_canonical([n for n in names if n is not None], f"{where}, class_availability[{case_id!r}]")
            available = [n for n in names if n is not None]
            extra = sorted(set(available) - classes)
            if extra:
                raise MergeError(f"{where}: class_availability[{case_id!r}] lists {extra}, which are not labels")
        else:
            available = sorted(classes)
        out_id = case_id if prefix is None or case_id.startswith(f"{prefix}_") else f"{prefix}_{case_id}"
        plan.cases.append(_SourceCase(case_id, out_id, images, label, available))
    return plan


def _lut(value_to_name: Mapping[int, str | None], ignore: tuple[int, int] | None, ids: Mapping[str, int]) -> np.ndarray:
    """Lookup table source value -> merged id; -1 marks values the source does not declare."""
    top = max([0, *value_to_name, *([ignore[0]] if ignore else [])])
    lut = np.full(top + 1, -1, dtype=np.int64)
    lut[0] = 0
    for v, n in value_to_name.items():
        lut[v] = 0 if n is None else ids[n]
    if ignore:
        lut[ignore[0]] = ignore[1]
    return lut


def merge_datasets(
    sources: Sequence[MergeSource],
    out_dir: Path,
    dataset_name: str | None = None,
    description: str = "",
    overwrite: bool = False,
) -> Path:
    """Merge ``sources`` into the raw dataset folder ``out_dir`` (e.g. ``$nnUNet_raw/Dataset500_DSM``)."""
    if not sources:
        raise MergeError("no source datasets given")
    plans = [_plan_source(s) for s in sources]

    all_sources: dict[str, str] = {}
    for p in plans:
        for prefix, desc in p.sources.items():
            if prefix in all_sources:
                raise MergeError(
                    f"case-id prefix {prefix!r} is used by more than one source ({p.path}); give each source "
                    "its own prefix."
                )
            all_sources[prefix] = desc
    seen: dict[str, Path] = {}
    for p in plans:
        for c in p.cases:
            if c.out_id in seen:
                raise MergeError(f"case id {c.out_id!r} occurs in {seen[c.out_id]} and {p.path}")
            seen[c.out_id] = p.path

    ids = assign_ids(set().union(*(p.classes for p in plans)))
    ignore_id = len(ids) + 1 if any(p.ignore_value is not None for p in plans) else None
    luts = [
        _lut(p.value_to_name, (p.ignore_value, ignore_id) if p.ignore_value is not None else None, ids)
        for p in plans
    ]
    out_dir = Path(out_dir)
    all_cases = [(lut, c) for p, lut in zip(plans, luts) for c in p.cases]
    dj = dsm_dataset_json(
        ids,
        num_training=len(all_cases),
        class_availability={c.out_id: c.available for _, c in all_cases},
        sources=all_sources,
        name=dataset_name or out_dir.name,
        description=description or "DSM merge of " + ", ".join(str(p.path.name) for p in plans),
    )
    if ignore_id is not None:
        dj["labels"]["ignore"] = ignore_id

    # Truncated or NaN images and labels off the image grid would be copied silently; stop before writing.
    # (Imported here: the checks import nnU-Net and torch, which `nnunetv2_dsm --help` must not.)
    from nnunetv2_dsm.checks.inputs import check_source_cases

    check_source_cases([(c.images[0], [c.label]) for _, c in all_cases], what="merge sources")
    with staged_dataset(out_dir, overwrite=overwrite, inputs=[p.path for p in plans]) as stage:
        for lut, c in tqdm(all_cases, desc="merge", unit="case"):
            copy_image(c.images[0], stage / "imagesTr" / f"{c.out_id}_0000{FILE_ENDING}")
            array, geometry = read_array(c.label)
            write_array(remap_labels(array, lut, str(c.label)), geometry, stage / "labelsTr" / f"{c.out_id}{FILE_ENDING}")
        write_json_atomic(stage / "dataset.json", dj)
    return out_dir
