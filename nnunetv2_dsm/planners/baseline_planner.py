"""Stock nnU-Net baseline planned with the same sizes as ``DSMPlannerCPU``.

For a fair comparison the baseline must see the same preprocessed data, the same patch and batch
size and the same encoder widths and depths as the DSM CPU model; only the network head and the
label handling differ. Inheriting from ``DSMPlannerCPU`` keeps those sizes in one place, and the
two DSM-specific steps (writing the DSM network and the DSM label manager into the plans) are
skipped by calling nnU-Net's ResEnc-M planner directly. The plans therefore hold nnU-Net's own
``ResidualEncoderUNet`` and its default ``LabelManager`` (softmax over labels, or sigmoid regions
when dataset.json defines regions), so stock trainers such as ``nnUNetTrainer`` train on them.

    nnUNetv2_plan_and_preprocess -d D -pl DSMBaselinePlannerCPU -c 3d_fullres
    nnUNetv2_train D 3d_fullres 0 -tr DSMBaselineTrainer_2epochs_NoMirroring -p ResEncPlansCPU -device cpu
"""

from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
    nnUNetPlannerResEncM,
)

from nnunetv2_dsm.planners.dsm_planner import DSMPlannerCPU

BASELINE_PLANS_CPU = "ResEncPlansCPU"


class DSMBaselinePlannerCPU(DSMPlannerCPU):
    """``DSMPlannerCPU``'s sizes with nnU-Net's ResidualEncoderUNet and LabelManager (plans ``ResEncPlansCPU``)."""

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = BASELINE_PLANS_CPU,
                 overwrite_target_spacing=None, suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset,
                                    _cache) -> dict:
        return nnUNetPlannerResEncM.get_plans_for_configuration(
            self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset, _cache)

    def plan_experiment(self) -> dict:
        plans = nnUNetPlannerResEncM.plan_experiment(self)
        self.write_patient_splits()
        return plans
