"""Mapping of TotalSegmentator ``total`` task structure names to the DSM canonical vocabulary.

Several TotalSegmentator structures merge into one DSM class (the lung lobes into a lung);
TotalSegmentator segments the whole femur where DSM names the femoral head, and we map the
femur to it because the femoral head is the part inside an abdominal CT field of view.
Structures without a DSM counterpart (vertebrae, ribs, muscles, ...) are dropped.
"""

TOTALSEG_TO_CANONICAL: dict[str, str] = {
    "spleen": "spleen",
    "kidney_right": "kidney_right",
    "kidney_left": "kidney_left",
    "gallbladder": "gallbladder",
    "liver": "liver",
    "stomach": "stomach",
    "pancreas": "pancreas",
    "adrenal_gland_right": "adrenal_gland_right",
    "adrenal_gland_left": "adrenal_gland_left",
    "lung_upper_lobe_left": "lung_left",
    "lung_lower_lobe_left": "lung_left",
    "lung_upper_lobe_right": "lung_right",
    "lung_middle_lobe_right": "lung_right",
    "lung_lower_lobe_right": "lung_right",
    "esophagus": "esophagus",
    "small_bowel": "intestine",
    "duodenum": "duodenum",
    "colon": "colon",
    "urinary_bladder": "bladder",
    "prostate": "prostate",
    "kidney_cyst_left": "kidney_cyst",
    "kidney_cyst_right": "kidney_cyst",
    "aorta": "aorta",
    "inferior_vena_cava": "postcava",
    "portal_vein_and_splenic_vein": "portal_vein_and_splenic_vein",
    "femur_left": "femur_head_left",
    "femur_right": "femur_head_right",
}

# TotalSegmentator v2 ``total`` task label ids (totalsegmentator/map_to_binary.py, class_map["total"])
# for the structures above.
TOTALSEG_TOTAL_IDS: dict[int, str] = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach",
    7: "pancreas", 8: "adrenal_gland_right", 9: "adrenal_gland_left", 10: "lung_upper_lobe_left",
    11: "lung_lower_lobe_left", 12: "lung_upper_lobe_right", 13: "lung_middle_lobe_right",
    14: "lung_lower_lobe_right", 15: "esophagus", 18: "small_bowel", 19: "duodenum", 20: "colon",
    21: "urinary_bladder", 22: "prostate", 23: "kidney_cyst_left", 24: "kidney_cyst_right",
    52: "aorta", 63: "inferior_vena_cava", 64: "portal_vein_and_splenic_vein", 75: "femur_left",
    76: "femur_right",
}
