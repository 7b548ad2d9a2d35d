"""Trainers of the learning benchmark (``benchmarks/learning.py``): DSM and stock nnU-Net on one budget.

Both run ``epochs x iterations`` training iterations (8 x 250, or ``DSM_BENCHMARK_EPOCHS`` x
``DSM_BENCHMARK_ITERATIONS``) with nnU-Net's own augmentation (mirroring
included), optimiser and schedule otherwise unchanged, a checkpoint every epoch, and write
``learning_log.json`` in the fold folder after every epoch: iterations done, this process's CPU
seconds (``time.process_time``, all threads; data augmentation included when ``nnUNet_n_proc_DA=0``)
and nnU-Net's validation pseudo-Dice of the epoch. With patient-level folds (``dsm.patients``) the
validation patches come from a patient the model never trains on, so that curve is held-out Dice
on patches; the benchmark adds full-volume Dice from ``nnUNetv2_predict`` at the end.

``DSMBaselineTrainer_Benchmark`` is nnU-Net's ``nnUNetTrainer``; its name starts with ``DSM`` only so
that nnU-Net's class lookup finds it in this package.
"""

import os
import time

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_dsm import settings
from nnunetv2_dsm.dataset import DSMDataset
from nnunetv2_dsm.io import atomic
from nnunetv2_dsm.trainers.baselines import StockBaselineTrainer
from nnunetv2_dsm.trainers.contrast_augmentation import ContrastPhaseAugmentation
from nnunetv2_dsm.trainers.diffugts_trainer import DiffuGTSTrainer
from nnunetv2_dsm.trainers.dsm_trainer import DSMTrainer
from nnunetv2_dsm.trainers.schedules import NoMirroring
from nnunetv2_dsm.trainers.sdseg_trainer import SDSegTrainer, SDSegTrainer_finalStep
from nnunetv2_dsm.trainers.stage2 import DSMTrainerStage2

LEARNING_LOG = "learning_log.json"


class _BenchmarkSchedule:
    epochs: int = 8
    iterations: int = 250

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # The benchmark script sets the budget for both models through these variables.
        self.num_epochs, self.num_iterations_per_epoch = settings.benchmark_budget(self.epochs, self.iterations)
        self.save_every = 1
        self._learning_log: list[dict] = []

    def on_epoch_end(self) -> None:
        epoch = self.current_epoch
        super().on_epoch_end()
        log = self.logger.get_value
        self._learning_log.append({
            "epoch": epoch,
            "iterations": (epoch + 1) * self.num_iterations_per_epoch,
            "cpu_seconds": round(time.process_time(), 2),
            "wall_seconds": round(log("epoch_end_timestamps", step=-1) - log("epoch_start_timestamps", step=0), 2),
            "train_loss": float(log("train_losses", step=-1)),
            "pseudo_dice": [float(d) for d in log("dice_per_class_or_region", step=-1)],
        })
        if self.local_rank == 0:
            # pseudo_dice follows the label order of dataset.json (both label managers use it)
            classes = DSMDataset.from_json(self.dataset_json).names
            atomic.write_json(os.path.join(self.output_folder, LEARNING_LOG),
                              {"classes": classes, "epochs": self._learning_log}, strict=False)


class DSMTrainer_Benchmark(_BenchmarkSchedule, DSMTrainer):
    """DSM stage 1 on the learning benchmark's budget (8 epochs x 250 iterations)."""


class DSMBaselineTrainer_Benchmark(_BenchmarkSchedule, StockBaselineTrainer):
    """Stock nnU-Net (``nnUNetTrainer``) on the learning benchmark's budget."""


class DSMTrainer_Benchmark_contrastAug(ContrastPhaseAugmentation, DSMTrainer_Benchmark):
    """DSM stage 1 on the benchmark's budget with contrast-phase augmentation."""


class DSMBaselineTrainer_Benchmark_contrastAug(ContrastPhaseAugmentation, DSMBaselineTrainer_Benchmark):
    """Stock nnU-Net on the benchmark's budget with contrast-phase augmentation."""


class DSMTrainer_Benchmark_contrastAug_noMirroring(NoMirroring, DSMTrainer_Benchmark_contrastAug):
    """DSM with contrast-phase augmentation and no mirroring (training or test time): left and right stay apart."""


class DSMBaselineTrainer_Benchmark_contrastAug_noMirroring(NoMirroring, DSMBaselineTrainer_Benchmark_contrastAug):
    """Stock nnU-Net with contrast-phase augmentation and no mirroring (training or test time)."""


class DSMTrainer_Demo(DSMTrainer_Benchmark):
    """The learning benchmark's DSM training on the budget of ``nnunetv2_dsm demo`` (a few CPU minutes)."""

    epochs = 4
    iterations = 150


class DSMTrainer_Demo_contrastAug(ContrastPhaseAugmentation, DSMTrainer_Demo):
    """The demo's budget with contrast-phase augmentation (``nnunetv2_dsm demo --trainer ...``)."""


class DSMTrainer_Benchmark_kmeansVoid(DSMTrainer_Benchmark):
    """The benchmark's DSM run with a void option in the k-means assignment (background joins no cluster)."""

    arch_overrides = {"kmeans_void": True}


class DSMTrainer_Benchmark_SGD(DSMTrainer_Benchmark):
    """The benchmark's DSM run with nnU-Net's optimiser (SGD, lr 1e-2, Nesterov 0.99) for every parameter."""

    def configure_optimizers(self):
        return nnUNetTrainer.configure_optimizers(self)


class DSMTrainer_Benchmark_decoderLR1e3(DSMTrainer_Benchmark):
    """The benchmark's DSM run with the query decoder's AdamW at lr 1e-3 (default 3e-4)."""

    decoder_lr = 1e-3


class DSMTrainer_Benchmark_staticQueries(DSMTrainer_Benchmark):
    """Diagnostic: the benchmark's DSM run with image-independent queries (no k-means update)."""

    arch_overrides = {"update_queries": False}


class DSMTrainer_Benchmark_noSSM(DSMTrainer_Benchmark):
    """The benchmark's DSM run without the state-space layer on the query responses."""

    arch_overrides = {"use_ssm": False}


class DSMTrainer_Benchmark_bgQuery(DSMTrainer_Benchmark):
    """The benchmark's DSM run with a background query: class masks relative to it, a background k-means cluster."""

    arch_overrides = {"background_query": True}


class DSMTrainer_Benchmark_bgQuery_updateDrop(DSMTrainer_Benchmark):
    """The benchmark's DSM run with a background query and stochastic depth (p = 0.5) on the k-means updates."""

    arch_overrides = {"background_query": True, "update_dropout": 0.5}


class SDSegTrainer_Benchmark(_BenchmarkSchedule, SDSegTrainer):
    """SDSeg on the learning benchmark's budget. Its validation is full single-step inference for every
    class, so the per-epoch curve uses 10 validation batches instead of 50 (training is unchanged)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_val_iterations_per_epoch = 10


class SDSegTrainer_Benchmark_finalStep(SDSegTrainer_Benchmark):
    final_step_fraction = SDSegTrainer_finalStep.final_step_fraction



class DSMTrainerStage2_Benchmark(_BenchmarkSchedule, DSMTrainerStage2):
    """DSM stage 2 on the benchmark's budget (``benchmarks/unseen.py``: from a benchmark stage-1 model)."""


class DSMTrainerStage2_Benchmark_contrastAug(ContrastPhaseAugmentation, DSMTrainerStage2_Benchmark):
    """DSM stage 2 on the benchmark's budget with contrast-phase augmentation."""


class DSMTrainerStage2_Benchmark_contrastAug_noAMVP(DSMTrainerStage2_Benchmark_contrastAug):
    """The unseen-tumour benchmark's no-AMVP ablation: tumour queries attend everywhere."""

    arch_overrides = {"use_amvp": False}


class DSMTrainerStage2_Benchmark_contrastAug_noDQR(DSMTrainerStage2_Benchmark_contrastAug):
    """The unseen-tumour benchmark's no-DQR ablation: tumour queries attend to the plain pixel feature."""

    arch_overrides = {"use_dqr": False}


class DiffuGTSTrainer_Benchmark(_BenchmarkSchedule, DiffuGTSTrainer):
    """DiffuGTS (method re-implemented, diffusion model trained here) on the benchmark's budget, at half the
    default widths: at the defaults one CPU step on the CPU plans' 14 slices of 112 x 128 takes 6-10 s."""

    network_kwargs = {"ae_channels": [16, 32, 32], "unet_channels": [32, 64, 64]}


class DiffuGTSTrainer_Benchmark_contrastAug(ContrastPhaseAugmentation, DiffuGTSTrainer_Benchmark):
    """The unseen-tumour benchmark's DiffuGTS run: contrast-phase augmentation, as every model there."""


class DiffuGTSTrainer_Benchmark_contrastAug_noGrounding(DiffuGTSTrainer_Benchmark_contrastAug):
    """The unseen-tumour benchmark's DiffuGTS run with the denoiser on the noise-prediction loss alone."""

    grounding_weights = (0.0, 0.0)
