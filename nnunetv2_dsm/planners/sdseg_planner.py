"""Plans for SDSeg on nnU-Net's ``2d`` (``SDSegTrainer``) and 3D (``SDSegTrainer3d``) configurations.

``nnUNetv2_plan_and_preprocess -d D -pl SDSegPlanner`` (or ``nnUNetv2_plan_experiment`` when the data are
already preprocessed by another planner: the data identifiers are nnU-Net's own ``nnUNetPlans_2d`` /
``nnUNetPlans_3d_fullres``, shared with stock nnU-Net and the DSM planners). Every configuration's
architecture becomes ``SDSegNetwork`` with the patch rounded up to what its autoencoder and UNet
divide: in 2D the paper's network (kl-f8 widths, 3 mask channels so LDM/SD autoencoders fit), in 3D
the volumetric one (narrower, 1 mask channel: no 3D prior exists). nnU-Net's label manager is kept
(softmax over disjoint labels). The DSM planners' input checks and patient-level folds apply; class
prompt names are not needed. ``SDSegPlannerCPU`` uses the CPU plans' patch and batch sizes
(``DSMPlannerCPU``) with the narrow networks the CPU benchmarks train.
"""

import math

from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
    nnUNetPlannerResEncM,
)

from nnunetv2_dsm.dataset import DSMDataset
from nnunetv2_dsm.planners.dsm_planner import DSMPlanner, use_cpu_sizes

SDSEG_NETWORK = "nnunetv2_dsm.networks.sdseg.SDSegNetwork"
# kl-f8 autoencoder channels of LDM, and a UNet of three resolutions on the latent.
SDSEG_DEFAULTS = {"ae_channels": [128, 256, 512, 512], "unet_channels": [128, 256, 256], "latent_channels": 4,
                  "mask_channels": 3, "norm_groups": 32, "layers_per_block": 2, "inference_steps": 1,
                  "noise_seed": 0}
SDSEG_CPU = {**SDSEG_DEFAULTS, "ae_channels": [16, 32, 64, 64], "unet_channels": [64, 128, 128], "norm_groups": 8,
             "layers_per_block": 1}
# Volumetric: the same depths (kl-f8, three UNet resolutions) at a quarter of the autoencoder's width.
SDSEG_3D = {**SDSEG_DEFAULTS, "ae_channels": [32, 64, 128, 128], "unet_channels": [64, 128, 256],
            "mask_channels": 1, "spatial_dims": 3}
SDSEG_3D_CPU = {**SDSEG_CPU, "mask_channels": 1, "spatial_dims": 3}


class SDSegPlanner(DSMPlanner):
    sdseg_kwargs: dict = SDSEG_DEFAULTS
    sdseg_3d_kwargs: dict = SDSEG_3D

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "SDSegPlans",
                 overwrite_target_spacing=None, suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)

    def check_dataset_json(self, dataset: DSMDataset) -> None:
        """SDSeg conditions on a class index, not on text: any label names will do."""

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset,
                                    _cache) -> dict:
        plan = nnUNetPlannerResEncM.get_plans_for_configuration(
            self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset, _cache)
        kwargs = dict(self.sdseg_kwargs if len(spacing) == 2 else self.sdseg_3d_kwargs)
        divisor = 2 ** (len(kwargs["ae_channels"]) - 1) * 2 ** (len(kwargs["unet_channels"]) - 1)
        plan["patch_size"] = [int(math.ceil(s / divisor) * divisor) for s in plan["patch_size"]]
        plan["architecture"] = {"network_class_name": SDSEG_NETWORK, "arch_kwargs": kwargs, "_kw_requires_import": []}
        return plan

    def plan_experiment(self) -> dict:
        plans = nnUNetPlannerResEncM.plan_experiment(self)
        self.write_patient_splits()
        return plans


class SDSegPlannerCPU(SDSegPlanner):
    """The CPU plans' patch and batch (``DSMPlannerCPU``) with a narrow SDSeg (plans ``SDSegPlansCPU``)."""

    sdseg_kwargs = SDSEG_CPU
    sdseg_3d_kwargs = SDSEG_3D_CPU

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "SDSegPlansCPU",
                 overwrite_target_spacing=None, suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        use_cpu_sizes(self)
