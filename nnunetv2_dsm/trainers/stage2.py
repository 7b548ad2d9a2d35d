"""DSM stage-2 trainers: tumour queries, AMVP, DQR and text alignment on top of a stage-1 model.

Train stage 1 with ``DSMTrainer``, then stage 2 from its weights with the stock command::

    nnUNetv2_train D 3d_fullres 0 -tr DSMTrainerStage2 -p DSMPlans \
        -pretrained_weights .../DSMTrainer__DSMPlans__3d_fullres/fold_0/checkpoint_final.pth

Both stages must use the same dataset classes and the same stage-1 queries (one per organ class, see
``DSMTrainer``). The deep-supervision outputs after the semantic one are the stage-1 outputs; the
partial-label loss keeps training the organ queries on them (tumour channels, which have no stage-1
query, are left out there), so stage 2 does not forget the organs. Seen tumours are learned only
through the semantic output: the tumour queries and the text.

The text encoder (class attribute ``text_encoder_spec``, env var ``DSM_TEXT_ENCODER`` overrides) embeds
the dataset's class prompts; the network's embedding width and organ channels are written into this
trainer's copy of the plans (``plans.json`` of the results folder), so ``nnUNetv2_predict`` and the
DSM predictor rebuild the same network, and the embeddings are stored in every checkpoint (key
``dsm_text``) and in ``<fold folder>/dsm_text.json`` + ``dsm_text_embeddings.pt``.
"""

import json
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_dsm import settings
from nnunetv2_dsm.dataset import DSMDataset
from nnunetv2_dsm.io.atomic import atomic_path
from nnunetv2_dsm.networks.dsm_stage2 import STAGE2_DEFAULTS, DSMStage2Network
from nnunetv2_dsm.text import class_prompt_embeddings, get_text_encoder
from nnunetv2_dsm.text.record import TEXT_CHECKPOINT_KEY, TEXT_EMBEDDINGS, TEXT_JSON
from nnunetv2_dsm.trainers.dsm_trainer import DSMTrainer, plans_with_arch_kwargs
from nnunetv2_dsm.trainers.variants import _NoMirroring, _ShortSchedule
from nnunetv2_dsm.vocabulary import prompt_for

STAGE2_NETWORK = f"{DSMStage2Network.__module__}.{DSMStage2Network.__name__}"
TEXT_ENCODER_ENV = settings.TEXT_ENCODER_VARIABLE


def _atomic_write(path: str, write) -> None:
    with atomic_path(path) as tmp:
        write(str(tmp))


def _write_json(data: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


class _TextCheckpoint(nnUNetTrainer):
    """Adds ``self.text_record()`` to the file nnU-Net's save_checkpoint writes.

    Sits between DSMTrainer and nnUNetTrainer in the MRO, so the key is added to DSMTrainer's temporary
    file before DSMTrainer renames it: the final checkpoint appears once, complete.
    """

    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)
        if self.local_rank == 0 and os.path.isfile(filename):
            checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
            checkpoint[TEXT_CHECKPOINT_KEY] = self.text_record()
            torch.save(checkpoint, filename)


class DSMTrainerStage2(DSMTrainer, _TextCheckpoint):
    """Stage-2 training; see the module docstring."""

    network_class = DSMStage2Network
    network_defaults = STAGE2_DEFAULTS
    text_encoder_spec: str = "minilm"
    # nnU-Net's SGD default is 1e-2; stage 2 fine-tunes a trained stage-1 model (paper: lower stage-2 lr).
    stage2_initial_lr: float = 1e-3
    decoder_lr: float = 1e-4
    stage2_kwargs: dict = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self.encoder_spec = settings.text_encoder_override() or self.text_encoder_spec
        self.text_encoder = get_text_encoder(self.encoder_spec)
        plans = self._plans_with_stage2_kwargs(plans, configuration, dataset_json, self.text_encoder.dim)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.stage2_initial_lr
        self.prompt_names = self.dsm_dataset.prompt_names
        self.text_embeddings = class_prompt_embeddings(self.text_encoder, self.prompt_names)

    def _plans_with_stage2_kwargs(self, plans: dict, configuration: str, dataset_json: dict, text_dim: int) -> dict:
        """A copy of the plans whose configuration carries the stage-2 arch_kwargs (text_dim, organ channels)."""
        arch = PlansManager(plans).get_configuration(configuration).network_arch_init_kwargs
        kwargs = {**STAGE2_DEFAULTS, **arch, **self.stage2_kwargs, "text_dim": text_dim,
                  "organ_channels": DSMDataset.from_json(dataset_json).organ_channels}
        # The results folder's plans.json then names the network actually built.
        return plans_with_arch_kwargs(plans, configuration, kwargs, STAGE2_NETWORK)

    def _output_availability(self, available: torch.Tensor, queried: torch.Tensor) -> torch.Tensor | list:
        """The semantic output counts every annotated class; the stage-1 outputs after it only the queried ones."""
        if not self.enable_deep_supervision:
            return available
        return [available] + [queried] * (len(self._get_deep_supervision_scales()) - 1)

    def initialize(self) -> None:
        first = not self.was_initialized
        super().initialize()
        if first:
            network = self._unwrapped_network()
            if network.tumour_decoder.class_embeddings is None:
                network.set_text_embeddings(self.text_embeddings)
            if self.local_rank == 0:
                self._write_text_record()

    def text_record(self) -> dict:
        """Encoder id, class names, prompts and embeddings (K, D) the model was trained with."""
        return {
            "encoder_id": self.text_encoder.encoder_id,
            "encoder_spec": self.encoder_spec,
            "class_names": self.prompt_names,
            "prompts": [prompt_for(name) for name in self.prompt_names],
            "embeddings": self.text_embeddings.clone(),
        }

    def _write_text_record(self) -> None:
        record = self.text_record()
        embeddings = record.pop("embeddings")
        record["embeddings_file"] = TEXT_EMBEDDINGS
        record["dim"] = int(embeddings.shape[1])
        os.makedirs(self.output_folder, exist_ok=True)
        _atomic_write(os.path.join(self.output_folder, TEXT_EMBEDDINGS), lambda p: torch.save(embeddings, p))
        _atomic_write(os.path.join(self.output_folder, TEXT_JSON), lambda p: _write_json(record, p))


class DSMTrainerStage2_allQueries(DSMTrainerStage2):
    """Stage 2 from a ``DSMTrainer_allQueries`` model: stage-1 queries for the seen tumours too."""

    organ_queries = False


class DSMTrainerStage2_noAMVP(DSMTrainerStage2):
    """Ablation: tumour queries attend everywhere (no anomaly mask prompt)."""

    arch_overrides = {"use_amvp": False}


class DSMTrainerStage2_noDQR(DSMTrainerStage2):
    """Ablation: no guided feature diffusion; the tumour queries attend to the plain feature."""

    arch_overrides = {"use_dqr": False}


class DSMTrainerStage2_noCLIP(DSMTrainerStage2):
    """Ablation: learned class embeddings instead of text embeddings (no open-vocabulary prompts)."""

    arch_overrides = {"use_text": False}


class DSMTrainerStage2_2epochs(_ShortSchedule, DSMTrainerStage2):
    """Two epochs of five iterations: a smoke run of stage 2."""


class DSMTrainerStage2_2epochs_NoMirroring(_NoMirroring, DSMTrainerStage2_2epochs):
    """The CPU smoke run of stage 2."""


class DSMTrainerStage2_10epochs_NoMirroring(_NoMirroring, _ShortSchedule, DSMTrainerStage2):
    epochs = 10
    iterations = 10


class DSMTrainerStage2_noAMVP_2epochs_NoMirroring(_NoMirroring, _ShortSchedule, DSMTrainerStage2_noAMVP):
    """The noAMVP ablation on the CPU leaderboard budget."""


class DSMTrainerStage2_noDQR_2epochs_NoMirroring(_NoMirroring, _ShortSchedule, DSMTrainerStage2_noDQR):
    """The noDQR ablation on the CPU leaderboard budget."""


class DSMTrainerStage2_noCLIP_2epochs_NoMirroring(_NoMirroring, _ShortSchedule, DSMTrainerStage2_noCLIP):
    """The noCLIP ablation on the CPU leaderboard budget."""


class DSMTrainerStage2_tiny_NoMirroring(_NoMirroring, _ShortSchedule, DSMTrainerStage2):
    """One epoch of two iterations with 4 tumour queries and one diffusion step: for tests on CPU."""

    epochs = 1
    iterations = 2
    stage2_kwargs = {"num_tumour_queries": 4, "dqr_steps": 1}
