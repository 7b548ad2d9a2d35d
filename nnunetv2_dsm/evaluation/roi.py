"""Regions of interest for voxel-level AUROC and FPR95, and how each is stated in reports.

Kept free of heavy imports so that command-line parsers can list the choices cheaply.
"""

BODY_THRESHOLD_HU = -500.0

ROI_MODES = ("body", "parent", "image")
ROI_DESCRIPTIONS = {
    "body": (
        f"body: CT > {BODY_THRESHOLD_HU:g} HU, largest connected component, holes filled "
        "(nnunetv2_dsm.evaluation.metrics.body_mask on <images>/<case>_0000)"
    ),
    "parent": (
        "parent organ: union of the reference masks of the parent organs of a tumour class "
        "(nnunetv2_dsm.vocabulary.TUMOUR_PARENTS); classes without a parent organ in the dataset "
        "use the body when an images folder is given, else the whole image"
    ),
    "image": "image: every voxel of the volume",
}
