"""Canonical class vocabulary of DSM: the 25 organs and 20 tumour types of the paper (section 4.2.3).

Dataset labels use the snake_case keys; text prompts use the display names.
Organs contain their tumours: a voxel of ``liver_tumor`` is also ``liver``.
"""

ORGANS: dict[str, str] = {
    "spleen": "Spleen",
    "kidney_right": "Right Kidney",
    "kidney_left": "Left Kidney",
    "gallbladder": "Gall Bladder",
    "esophagus": "Esophagus",
    "liver": "Liver",
    "stomach": "Stomach",
    "aorta": "Aorta",
    "postcava": "Postcava",
    "portal_vein_and_splenic_vein": "Portal Vein and Splenic Vein",
    "pancreas": "Pancreas",
    "adrenal_gland_right": "Right Adrenal Gland",
    "adrenal_gland_left": "Left Adrenal Gland",
    "duodenum": "Duodenum",
    "hepatic_vessel": "Hepatic Vessel",
    "lung_right": "Right Lung",
    "lung_left": "Left Lung",
    "colon": "Colon",
    "intestine": "Intestine",
    "rectum": "Rectum",
    "bladder": "Bladder",
    "prostate": "Prostate",
    "femur_head_left": "Left Head of Femur",
    "femur_head_right": "Right Head of Femur",
    "celiac_trunk": "Celiac Truck",
}

TUMOURS: dict[str, str] = {
    "spleen_tumor": "Spleen Tumor",
    "kidney_tumor": "Kidney Tumor",
    "kidney_cyst": "Kidney Cyst",
    "gallbladder_tumor": "Gall Bladder Tumor",
    "esophagus_tumor": "Esophagus Tumor",
    "liver_tumor": "Liver Tumor",
    "stomach_tumor": "Stomach Tumor",
    "aortic_tumor": "Aortic Tumor",
    "postcava_tumor_thrombus": "Postcava Tumor Thrombus",
    "portal_vein_tumor_thrombus": "Portal Vein Tumor Thrombus",
    "pancreas_tumor": "Pancreas Tumor",
    "adrenal_tumor": "Adrenal Tumor",
    "adrenal_cyst": "Adrenal Cyst",
    "duodenal_tumor": "Duodenal Tumor",
    "hepatic_vessel_tumor": "Hepatic Vessel Tumor",
    "lung_tumor": "Lung Tumor",
    "lung_cyst": "Lung Cyst",
    "colon_tumor": "Colon Tumor",
    "small_intestinal_neoplasm": "Small Intestinal Neoplasm",
    "rectal_tumor": "Rectal Tumor",
}

# Organs that contain each tumour type; a tumour voxel belongs to one of them.
TUMOUR_PARENTS: dict[str, tuple[str, ...]] = {
    "spleen_tumor": ("spleen",),
    "kidney_tumor": ("kidney_right", "kidney_left"),
    "kidney_cyst": ("kidney_right", "kidney_left"),
    "gallbladder_tumor": ("gallbladder",),
    "esophagus_tumor": ("esophagus",),
    "liver_tumor": ("liver",),
    "stomach_tumor": ("stomach",),
    "aortic_tumor": ("aorta",),
    "postcava_tumor_thrombus": ("postcava",),
    "portal_vein_tumor_thrombus": ("portal_vein_and_splenic_vein",),
    "pancreas_tumor": ("pancreas",),
    "adrenal_tumor": ("adrenal_gland_right", "adrenal_gland_left"),
    "adrenal_cyst": ("adrenal_gland_right", "adrenal_gland_left"),
    "duodenal_tumor": ("duodenum",),
    "hepatic_vessel_tumor": ("hepatic_vessel", "liver"),
    "lung_tumor": ("lung_right", "lung_left"),
    "lung_cyst": ("lung_right", "lung_left"),
    "colon_tumor": ("colon",),
    "small_intestinal_neoplasm": ("intestine", "duodenum"),
    "rectal_tumor": ("rectum",),
}

CANONICAL: dict[str, str] = {**ORGANS, **TUMOURS}

PROMPT_TEMPLATE = "a computerized tomography of a {}"


def display_name(name: str) -> str:
    """Display name used in text prompts; free text (an unseen class) is returned unchanged."""
    return CANONICAL.get(name, name)


def prompt_for(name: str) -> str:
    return PROMPT_TEMPLATE.format(display_name(name))


def is_tumour(name: str) -> bool:
    return name in TUMOURS


def check_canonical(names: list[str], source: str) -> None:
    """Raise a clear error naming ``source`` if any class name is outside the vocabulary."""
    unknown = [n for n in names if n not in CANONICAL]
    if unknown:
        raise ValueError(
            f"{source}: unknown class name(s) {unknown}. DSM datasets use the canonical vocabulary "
            f"(nnunetv2_dsm.vocabulary.CANONICAL), e.g. {list(ORGANS)[:4]} or {list(TUMOURS)[:2]}; "
            "rename the labels in dataset.json or convert the dataset with an `nnunetv2_dsm recipe`."
        )
