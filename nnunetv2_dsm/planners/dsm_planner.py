"""DSM experiment planners.

They keep nnU-Net's fingerprinting, target spacing and patch-size logic (ResEnc M planner: the
ResEnc backbone that DSM builds on) and only swap the network written into the plans for the DSM
network with its decoder arguments, and the label manager for the sigmoid-region one.
"""

from typing import Any

from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
    nnUNetPlannerResEncM,
)
from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

from nnunetv2_dsm import settings
from nnunetv2_dsm.checks.inputs import check_raw_dataset, mixed_orientation_error
from nnunetv2_dsm.dataset import DSMDataset, DSMDatasetError
from nnunetv2_dsm.errors import raise_input_errors
from nnunetv2_dsm.io.orientation import ORIENTATION_KEY, file_orientation
from nnunetv2_dsm.planners.patient_splits import write_patient_splits
from nnunetv2_dsm.settings import SKIP_CHECKS_VARIABLE  # noqa: F401 - re-exported for callers

DSM_NETWORK = "nnunetv2_dsm.networks.dsm_network.DSMNetwork"

# Decoder settings written into the plans (paper section 5: 4 kMMM layers, one query per class).
DSM_DECODER_DEFAULTS: dict[str, Any] = {
    "num_kmmm_layers": 4,
    "query_dim": 128,
    "ffn_dim": 256,
    "num_heads": 8,
    "ssm_d_state": 16,
    "ssm_expand": 2,
    "ssm_bidirectional": True,
    "use_kmeans": True,
    "use_ssm": True,
}


class DSMPlanner(nnUNetPlannerResEncM):
    decoder_kwargs: dict[str, Any] = DSM_DECODER_DEFAULTS

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "DSMPlans",
                 overwrite_target_spacing=None, suppress_transpose: bool = False):
        # Checked before nnU-Net's own set-up so a dataset DSM cannot use fails with DSM's explanation.
        raw_folder = join(nnUNet_raw, maybe_convert_to_dataset_name(dataset_name_or_id))
        dataset_json_file = join(raw_folder, "dataset.json")
        check_before_planning(raw_folder)
        self.check_dataset_json(DSMDataset.from_json(load_json(dataset_json_file), dataset_json_file))
        self.training_orientation = training_orientation(raw_folder, load_json(dataset_json_file))
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)

    def check_dataset_json(self, dataset: DSMDataset) -> None:
        """DSM trains text-aligned queries: every class needs a prompt name."""
        dataset.require_prompts()

    @staticmethod
    def static_estimate_VRAM_usage(patch_size, input_channels: int, output_channels: int, arch_class_name: str,
                                   arch_kwargs: dict, arch_kwargs_req_import) -> int:
        """nnU-Net's estimate without its ``torch.set_num_threads(nnUNet_n_proc_DA)``, which fails for
        ``nnUNet_n_proc_DA=0`` (augmentation in the main process, as recommended on small CPUs)."""
        net = get_network_from_plans(arch_class_name, arch_kwargs, arch_kwargs_req_import, input_channels,
                                     output_channels, allow_init=False)
        return net.compute_conv_feature_map_size(patch_size)

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset,
                                    _cache) -> dict:
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        architecture = plan["architecture"]
        architecture["network_class_name"] = DSM_NETWORK
        architecture["arch_kwargs"].update(self.decoder_kwargs)
        return plan

    def plan_experiment(self) -> dict:
        plans = super().plan_experiment()
        plans["label_manager"] = "DSMLabelManager"
        # The orientation the training images are stored in; `nnunetv2_dsm predict` reorients inputs to it.
        plans[ORIENTATION_KEY] = self.training_orientation
        self.write_patient_splits()
        self.plans = plans
        self.save_plans(plans)
        return plans


    def write_patient_splits(self) -> None:
        """Patient-level folds when dataset.json lists patients (``patient_splits``)."""
        cases = sorted(self.dataset)
        write_patient_splits(join(nnUNet_preprocessed, self.dataset_name), self.dataset_json, cases)


class DSMPlannerCPU(DSMPlanner):
    """A narrow DSM network with small patches, for CPU runs, demos and tests (plans ``DSMPlansCPU``)."""

    decoder_kwargs = {**DSM_DECODER_DEFAULTS, "query_dim": 32, "ffn_dim": 64, "num_heads": 4,
                      "ssm_bidirectional": False}

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "DSMPlansCPU",
                 overwrite_target_spacing=None, suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        use_cpu_sizes(self)


def use_cpu_sizes(planner: DSMPlanner) -> None:
    """The sizes of the CPU plans (every method's CPU planner uses them, so patches and batches agree)."""
    planner.UNet_base_num_features = 8
    planner.UNet_max_features_3d = 64
    planner.UNet_max_features_2d = 64
    planner.UNet_blocks_per_stage_encoder = (1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2)
    # Reference values scaled so the VRAM heuristic settles on patches of about 64^3 / 128^2.
    planner.UNet_reference_val_3d = 12_000_000
    planner.UNet_reference_val_2d = 1_500_000


def check_before_planning(raw_folder: str) -> None:
    """The checks of ``nnunetv2_dsm check`` on the raw dataset; every problem found stops planning.

    nnU-Net reads NaN voxels as 0, half of a truncated file, undeclared or empty label maps without a
    word; this runs before any plans or preprocessed data are written. ``DSM_SKIP_CHECKS=1`` skips it
    (large datasets that were already checked).
    """
    if settings.skip_checks():
        return
    raise_input_errors(check_raw_dataset(raw_folder, progress=True))


def training_orientation(raw_folder: str, dataset_json: dict) -> str | None:
    """Orientation code shared by all training images (headers only); mixed orientations are an error.

    None when no header can be read (nnU-Net's own reader then reports the files).
    """
    cases = get_filenames_of_train_images_and_targets(raw_folder, dataset_json)
    orientations = {}
    for case in cases.values():
        try:
            orientations[case["images"][0]] = file_orientation(case["images"][0])
        except RuntimeError:
            continue
    error = mixed_orientation_error(orientations)
    if error is not None:
        raise DSMDatasetError(str(error))
    return next(iter(orientations.values()), None)
