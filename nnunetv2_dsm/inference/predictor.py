"""Open-vocabulary DSM prediction from text prompts, with anomaly maps, on top of nnU-Net's predictor.

nnU-Net's ``nnUNetPredictor`` does the preprocessing, sliding window, mirroring and resampling; this
subclass gives the model the embeddings of the prompts (``DSMStage2Network.set_prompts``: each prompt
is scored against the trained class names and no-object, not against the other prompts, and a prompt
that names a trained class gives that class's trained output), turns on the anomaly channel and
replaces the label manager by one for the K' prompts + the anomaly channel, so nnU-Net's machinery
handles K'+1 output channels. Per case it writes, in the input image's geometry:

- ``<case>.nii.gz``: label map, id i (1..K', prompt order) where prompt i's probability exceeds 0.5;
  where several do, tumour prompts win over organ prompts (organs contain their tumours) and, within
  a role, the more probable prompt wins, whatever the prompt order;
- ``scores/<case>_<prompt-slug>.nii.gz``: the probability map of every prompt;
- ``scores/<case>_anomaly.nii.gz``: the anomaly map, ``S = -max`` over the organ channels of the
  stage-1 logits, min-max normalised over the whole case;
- ``prompts.json``: the label ids, prompts and the model and encoder used.

Score maps are in ``scores/`` because nnU-Net's evaluation reads every ``.nii.gz`` of a folder as a
label map. Models without text alignment (stage-1 ``DSMTrainer`` models, the ``_noCLIP`` ablation)
predict only their trained classes: their prompts must name trained classes.
"""

import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from torch import Tensor, nn
from tqdm import tqdm

from nnunetv2_dsm.checks.inputs import InputError, check_prediction_inputs, read_image_checked
from nnunetv2_dsm.dataset import DSMDataset
from nnunetv2_dsm.inference.prompts import (
    ANOMALY,
    SCORES_DIR,
    DSMPredictionError,
    check_prompts,
    class_name_for_prompt,
    is_tumour_prompt,
    label_map,
    prompt_slug,
)
from nnunetv2_dsm.io import atomic
from nnunetv2_dsm.io.atomic import atomic_path
from nnunetv2_dsm.io.checkpoint import readable_checkpoint
from nnunetv2_dsm.io.orientation import ORIENTATION_KEY, reorient_files, restore_geometry
from nnunetv2_dsm.label_handling.dsm_label_manager import DSMLabelManager
from nnunetv2_dsm.networks.amvp import minmax_per_case
from nnunetv2_dsm.networks.dsm_network import DSMNetwork
from nnunetv2_dsm.networks.dsm_stage2 import DSMStage2Network
from nnunetv2_dsm.networks.unwrap import uncompiled
from nnunetv2_dsm.text import check_encoder_matches, class_prompt_embeddings, get_text_encoder
from nnunetv2_dsm.text.record import TEXT_CHECKPOINT_KEY, TEXT_JSON
from nnunetv2_dsm.text.spec import spec_hint
from nnunetv2_dsm.vocabulary import CANONICAL, prompt_for


class TrainedClassSelection(nn.Module):
    """Output channels ``channels`` of a model without text alignment, plus its anomaly channel.

    ``anomaly_from`` is the channel the wrapped network already appends (``export_anomaly``), or None to
    compute ``-max`` over ``organ_channels`` of the network's own output (stage-1 networks). Weights load
    into the wrapped network, so nnU-Net's per-fold ``load_state_dict`` keeps working.
    """

    def __init__(self, network: nn.Module, channels: list[int], organ: list[int], anomaly_from: int | None) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("channels", torch.tensor(channels, dtype=torch.long), persistent=False)
        self.register_buffer("organ", torch.tensor(organ, dtype=torch.long), persistent=False)
        self.anomaly_from = anomaly_from

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.network.load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C_in, *S) -> (B, K' + 1, *S)
        out = self.network(x)
        if self.anomaly_from is None:
            anomaly = -out[:, self.organ].amax(dim=1, keepdim=True)
        else:
            anomaly = out[:, self.anomaly_from : self.anomaly_from + 1]
        return torch.cat([out[:, self.channels], anomaly], dim=1)


def _write_image(image: sitk.Image, path: Path) -> None:
    sitk.WriteImage(image, str(path), True)


def _write_atomic(image: sitk.Image, path: Path) -> None:
    try:
        # SimpleITK can return without error from a short write (a full disk): the file is read back.
        with atomic_path(path, check=read_image_checked) as tmp:
            _write_image(image, tmp)
    except (RuntimeError, OSError, InputError) as err:
        raise DSMPredictionError(
            f"could not write {path} ({getattr(err, 'reason', err)}); free disk space or choose another output "
            "folder (nothing of this case was left half-written)"
        ) from err


def _to_image(array: np.ndarray, properties: dict) -> sitk.Image:
    geometry = properties["sitk_stuff"]
    if len(geometry["spacing"]) == 2:
        array = array[0]
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(geometry["spacing"])
    image.SetOrigin(geometry["origin"])
    image.SetDirection(geometry["direction"])
    return image


# How the anomaly mask prompt is normalised in sliding-window inference: per tile (as in training, where
# the network sees one patch) or per case (a first pass over every tile collects the range; twice the time).
AMVP_RANGES = ("tile", "case")


class DSMPredictor(nnUNetPredictor):
    """nnU-Net predictor for DSM models with text prompts; see the module docstring.

    Use ``initialize_from_trained_model_folder(model_folder, folds, checkpoint)`` and then
    ``predict_folder(input_folder, output_folder)``.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        text_encoder: str | None = None,
        tile_step_size: float = 0.5,
        use_mirroring: bool = True,
        device: torch.device = torch.device("cuda"),
        allow_tqdm: bool = True,
        amvp_range: str = "tile",
    ) -> None:
        if amvp_range not in AMVP_RANGES:
            raise DSMPredictionError(f"amvp_range must be one of {AMVP_RANGES}, got {amvp_range!r}")
        self.amvp_range = amvp_range
        self.slugs = check_prompts(prompts)
        self.prompts = [p.strip() for p in prompts]
        self.text_encoder_spec = text_encoder
        self.encoder_id: str | None = None
        super().__init__(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                         perform_everything_on_device=device.type == "cuda", device=device, allow_tqdm=allow_tqdm)

    def initialize_from_trained_model_folder(
        self, model_training_output_dir: str, use_folds: tuple[int | str, ...] | None,
        checkpoint_name: str = "checkpoint_final.pth",
    ) -> None:
        model_folder = Path(model_training_output_dir)
        if not (model_folder / "plans.json").is_file():
            raise DSMPredictionError(
                f"{model_folder} is not a trained nnU-Net model folder (no plans.json); pass the folder "
                "<nnUNet_results>/<Dataset>/<Trainer>__<Plans>__<configuration>."
            )
        if use_folds is None:
            use_folds = self.auto_detect_available_folds(str(model_folder), checkpoint_name)
            if not use_folds:
                raise DSMPredictionError(f"{model_folder}: no fold_*/{checkpoint_name} found; train the model first.")
        else:
            missing = [f for f in use_folds if not (model_folder / f"fold_{f}" / checkpoint_name).is_file()]
            if missing:
                available = self.auto_detect_available_folds(str(model_folder), checkpoint_name)
                raise DSMPredictionError(
                    f"{model_folder}: no {checkpoint_name} for fold(s) {missing} "
                    f"({', '.join(str(model_folder / f'fold_{f}' / checkpoint_name) for f in missing)}); "
                    f"folds with that checkpoint: {sorted(available, key=str) or 'none'}. Pass -f with those "
                    "folds, or --checkpoint checkpoint_best.pth for a run that has not finished"
                )
        try:
            super().initialize_from_trained_model_folder(str(model_folder), use_folds, checkpoint_name)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
            unreadable = [f for f in use_folds if not readable_checkpoint(model_folder / f"fold_{f}" / checkpoint_name)]
            if not unreadable:
                raise
            raise DSMPredictionError(
                f"{', '.join(str(model_folder / f'fold_{f}' / checkpoint_name) for f in unreadable)}: not a readable "
                f"checkpoint ({err}); it is truncated or not a torch checkpoint. Copy it again, or predict with "
                "the other folds (-f)"
            ) from err
        # nnU-Net names model folders <Trainer>__<Plans>__<configuration>.
        self.configuration_name = model_folder.resolve().name.split("__")[-1]
        network = uncompiled(self.network)
        dataset = DSMDataset.from_json(self.dataset_json, model_folder / "dataset.json")
        trained = dataset.prompt_names
        organ = dataset.organ_channels
        if isinstance(network, DSMStage2Network) and network.tumour_decoder.class_embeddings is None:
            fold = use_folds[0] if isinstance(use_folds, (list, tuple)) else use_folds
            record = self._text_record(model_folder / f"fold_{fold}", checkpoint_name)
            network.set_prompts(self._embed(record), self._trained_index(trained))
            network.export_anomaly = True
        else:
            channels = self._trained_channels(trained)
            if isinstance(network, DSMStage2Network):
                network.export_anomaly = True
                self.network = TrainedClassSelection(network, channels, organ, anomaly_from=len(trained))
            else:
                queried = network.queried if isinstance(network, DSMNetwork) else None
                unqueried = [trained[c] for c in channels if queried is not None and not queried[c]]
                if unqueried:
                    raise DSMPredictionError(
                        f"{model_folder}: this is a DSM stage-1 model, which has a query for organs only; "
                        f"{unqueried} are tumour classes, which stage 2 predicts. Train stage 2 from this model "
                        "(nnUNetv2_train ... -tr DSMTrainerStage2 -pretrained_weights <its checkpoint>) and "
                        "predict with that, or ask this model for organs only"
                    )
                self.network = TrainedClassSelection(network, channels, organ, anomaly_from=None)
        self.network.eval()
        labels = {"background": 0, **{slug: i + 1 for i, slug in enumerate(self.slugs)},
                  ANOMALY: len(self.slugs) + 1}
        self.label_manager = DSMLabelManager(labels, None)
        self.training_orientation = self.plans_manager.plans.get(ORIENTATION_KEY) or dataset.orientation
        if self.plans_manager.image_reader_writer_class is not SimpleITKIO:
            raise DSMPredictionError(
                f"{model_folder / 'plans.json'}: image_reader_writer is "
                f"{self.plans_manager.image_reader_writer_class.__name__}; DSM score maps are written with "
                "SimpleITKIO (NIfTI/NRRD/MHA inputs). Plan the dataset with images nnU-Net reads via SimpleITKIO."
            )

    def _text_record(self, fold_folder: Path, checkpoint_name: str) -> dict:
        path = fold_folder / TEXT_JSON
        if path.is_file():
            return json.loads(path.read_text())
        checkpoint = torch.load(fold_folder / checkpoint_name, map_location="cpu", weights_only=False)
        if TEXT_CHECKPOINT_KEY not in checkpoint:
            raise DSMPredictionError(
                f"{fold_folder}: neither {TEXT_JSON} nor a '{TEXT_CHECKPOINT_KEY}' entry in {checkpoint_name}; "
                "the model was not trained by a DSMTrainerStage2 trainer, or the fold folder is incomplete."
            )
        return checkpoint[TEXT_CHECKPOINT_KEY]

    def _embed(self, record: dict) -> Tensor:
        stored_id = record["encoder_id"]
        spec = self.text_encoder_spec or record.get("encoder_spec") or spec_hint(stored_id)
        encoder = get_text_encoder(spec)
        check_encoder_matches(stored_id, encoder)
        self.encoder_id = encoder.encoder_id
        return class_prompt_embeddings(encoder, [class_name_for_prompt(p) for p in self.prompts])

    def _trained_index(self, trained: list[str]) -> list[int]:
        """For each prompt, the trained class it names (by key or display name), or -1."""
        by_slug = {prompt_slug(name): i for i, name in enumerate(trained)}
        by_slug.update({prompt_slug(CANONICAL.get(name, name)): i for i, name in enumerate(trained)})
        return [by_slug.get(s, -1) for s in self.slugs]

    def _trained_channels(self, trained: list[str]) -> list[int]:
        index = self._trained_index(trained)
        unknown = [p for p, i in zip(self.prompts, index) if i < 0]
        if unknown:
            raise DSMPredictionError(
                f"this model has no text alignment (a stage-1 DSMTrainer or _noCLIP model), so it predicts only "
                f"its trained classes {trained}; prompts {unknown} are not among them. Use a DSMTrainerStage2 "
                "model for new class names."
            )
        return index

    def predict_folder(self, input_folder: str | Path, output_folder: str | Path) -> list[str]:
        """Predict every case of ``input_folder`` (nnU-Net naming, ``<case>_0000.nii.gz``); returns case ids."""
        input_folder, output_folder = Path(input_folder), Path(output_folder)
        if not input_folder.is_dir():
            raise DSMPredictionError(f"input folder {input_folder} does not exist")
        if output_folder.resolve() == input_folder.resolve():
            raise DSMPredictionError(
                f"output folder {output_folder} is the input folder; predictions would sit among (and could "
                "overwrite) the input images. Give a separate output folder."
            )
        ending = self.dataset_json["file_ending"]
        # Every case is checked (readable, channels, NaN/Inf, dimensionality, writable output) before
        # anything is written.
        cases = check_prediction_inputs(input_folder, self.dataset_json, self.plans_manager, self.configuration_name,
                                        output_folder, progress=self.allow_tqdm)
        if not cases:
            raise DSMPredictionError(
                f"{input_folder} holds no images named <case>_0000{ending} (nnU-Net's naming, one file per channel)"
            )
        inputs = {Path(f).resolve() for files in cases for f in files}
        (output_folder / SCORES_DIR).mkdir(parents=True, exist_ok=True)
        earlier = self._earlier_slugs(output_folder)
        self._write_prompts_json(output_folder)
        preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
        done = []
        for files in tqdm(cases, desc="DSM predict", unit="case", disable=not self.allow_tqdm):
            case = os.path.basename(files[0])[: -(len(ending) + 5)]
            targets = self._output_paths(output_folder, case)
            clash = [t for t in targets if t.resolve() in inputs]
            if clash:
                raise DSMPredictionError(f"output {clash[0]} is an input file; choose another output folder")
            # Maps of prompts an earlier run into this folder asked for and this run does not: they would
            # sit beside a prompts.json that no longer lists them.
            for slug in earlier - set(self.slugs):
                (output_folder / SCORES_DIR / f"{case}_{slug}.nii.gz").unlink(missing_ok=True)
            data, _, properties, grid = self._preprocess_case(preprocessor, case, files)
            logits = self.predict_logits_from_preprocessed_data(torch.from_numpy(data)).float()
            self._export(logits, properties, targets, grid)
            done.append(case)
        return done

    def _preprocess_case(self, preprocessor, case: str, files: list[str], mask: str | Path | None = None):
        """nnU-Net's preprocessing of case ``case``'s channel files (and a mask on the same grid, nearest
        resampling, as nnU-Net treats a segmentation): (data, mask or None, properties, grid). Subclasses
        use ``case`` to find per-case inputs."""
        with tempfile.TemporaryDirectory(prefix="dsm_reoriented_") as tmp:
            # Inputs in another orientation than the training images are reoriented (losslessly)
            # and every output is mapped back onto the input's own grid.
            both = [*files, *([mask] if mask is not None else [])]
            reoriented = reorient_files(both, self.training_orientation, tmp) if self.training_orientation else None
            run_files, grid = ([str(f) for f in reoriented[0]], reoriented[1]) if reoriented else (both, None)
            run_mask = run_files.pop() if mask is not None else None
            data, seg, properties = preprocessor.run_case(
                run_files, run_mask, self.plans_manager, self.configuration_manager, self.dataset_json
            )
        return data, seg, properties, grid

    def _amvp(self):
        """The stage-2 network's AMVP module when it uses one, else None."""
        network = self.network.network if isinstance(self.network, TrainedClassSelection) else self.network
        network = uncompiled(network)
        if isinstance(network, DSMStage2Network) and network.tumour_decoder.use_amvp:
            return network.tumour_decoder.amvp
        return None

    def predict_logits_from_preprocessed_data(self, data: Tensor) -> Tensor:
        """nnU-Net's sliding-window prediction; with ``amvp_range="case"`` a first pass over every tile (and
        fold) records the anomaly score's range per level, and the second pass normalises with it."""
        amvp = self._amvp() if self.amvp_range == "case" else None
        if amvp is None:
            return super().predict_logits_from_preprocessed_data(data)
        amvp.record_case_range()
        try:
            super().predict_logits_from_preprocessed_data(data)
            amvp.use_case_range()
            return super().predict_logits_from_preprocessed_data(data)
        finally:
            amvp.clear_case_range()

    @staticmethod
    def _earlier_slugs(output_folder: Path) -> set[str]:
        """Prompt slugs of the prompts.json an earlier run left in ``output_folder``."""
        try:
            info = json.loads((output_folder / "prompts.json").read_text())
            return {p["slug"] for p in info["prompts"] if isinstance(p.get("slug"), str) and p["slug"]}
        except (OSError, ValueError, KeyError, TypeError):
            return set()

    def _output_paths(self, output_folder: Path, case: str) -> list[Path]:
        scores = output_folder / SCORES_DIR
        return [output_folder / f"{case}.nii.gz", *[scores / f"{case}_{s}.nii.gz" for s in self.slugs],
                scores / f"{case}_{ANOMALY}.nii.gz"]

    def _write_prompts_json(self, output_folder: Path) -> None:
        info = {
            "labels": {"background": 0, **{s: i + 1 for i, s in enumerate(self.slugs)}},
            "prompts": [
                {"id": i + 1, "prompt": p, "slug": s, "text": prompt_for(class_name_for_prompt(p)),
                 "probability_map": f"{SCORES_DIR}/<case>_{s}.nii.gz"}
                for i, (p, s) in enumerate(zip(self.prompts, self.slugs))
            ],
            "label_map": "<case>.nii.gz: id of the prompt whose probability exceeds 0.5; where several do, "
                         "tumour prompts win over organ prompts, then the more probable prompt",
            "anomaly_map": f"{SCORES_DIR}/<case>_{ANOMALY}.nii.gz: -max organ logit, min-max normalised per case",
            "trainer": self.trainer_name,
            "text_encoder": self.encoder_id,
        }
        atomic.write_json(output_folder / "prompts.json", info)

    def _export(self, logits: Tensor, properties: dict, targets: list[Path], grid: dict | None = None) -> None:
        # logits: (K' + 1, *S_preprocessed); the last channel is the raw anomaly score
        logits = self._resample(logits, properties)
        probabilities = torch.sigmoid(logits[:-1])
        anomaly = minmax_per_case(logits[-1:])[0]
        labels = label_map(probabilities, [is_tumour_prompt(p) for p in self.prompts])
        self._write_volumes([labels.numpy(), *probabilities.numpy(), anomaly.numpy()], properties, targets, grid)

    def _resample(self, channels: Tensor, properties: dict) -> Tensor:
        """Channels on the preprocessed grid -> the cropped input grid (nnU-Net's probability resampling)."""
        # channels: (C, *S_preprocessed) -> (C, *S_cropped)
        spacing = [properties["spacing"][i] for i in self.plans_manager.transpose_forward]
        shape = properties["shape_after_cropping_and_before_resampling"]
        current = (self.configuration_manager.spacing if len(self.configuration_manager.spacing) == len(shape)
                   else [spacing[0], *self.configuration_manager.spacing])
        return torch.as_tensor(
            self.configuration_manager.resampling_fn_probabilities(channels, shape, current, spacing)
        ).float()

    def _write_volumes(self, volumes: list[np.ndarray], properties: dict, targets: list[Path],
                       grid: dict | None = None) -> None:
        """Uncrop, transpose back and write each volume to its target, in the input's geometry."""
        # The first target (the label map) is written last: its presence marks a finished case, so a
        # prediction killed half-way never leaves a case that looks complete.
        for volume, target in reversed(list(zip(volumes, targets))):
            full = np.zeros(properties["shape_before_cropping"], dtype=volume.dtype)
            full = insert_crop_into_image(full, volume, properties["bbox_used_for_cropping"])
            full = np.ascontiguousarray(full.transpose(self.plans_manager.transpose_backward))
            image = _to_image(full, properties)
            _write_atomic(image if grid is None else restore_geometry(image, **grid), target)
