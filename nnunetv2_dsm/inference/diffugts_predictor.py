"""DiffuGTS prediction (DiffuGTS method, diffusion model trained here) with DSM's prompt interface.

``nnunetv2_dsm diffugts-predict -i IN -o OUT -m MODEL --prompts "spleen tumor" ...`` reads, checks,
reorients and preprocesses like ``nnunetv2_dsm predict`` (``DSMPredictor``), then works on whole slices
(no sliding window: the refinement inpaints a slice at a time). Per prompt and slice: the anomaly-aware
attention map of the prompt's (healthy, abnormal) pair gives p; the region p > ``threshold`` is inpainted
from the healthy prompt (``networks.diffugts_inpaint``); the residual refines p. Written in the input
geometry:

- ``scores/<case>_<prompt>.nii.gz``: the refined probability;
- ``diffugts/<case>_<prompt>_attention.nii.gz``: p before refinement;
- ``diffugts/<case>_<prompt>_residual.nii.gz``: the pixel + feature residual in [0, 1);
- ``diffugts/<case>_<prompt>_pseudo_healthy.nii.gz``: the pseudo-healthy image, in the input's intensities
  (nnU-Net's CT normalisation undone);
- ``<case>.nii.gz``: label ids where a refined probability exceeds 0.5 (written last), and ``prompts.json``.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from torch import Tensor

from nnunetv2_dsm.dataset import DSMDataset
from nnunetv2_dsm.inference.predictor import DSMPredictor, _unwrap
from nnunetv2_dsm.inference.prompts import SCORES_DIR, DSMPredictionError, class_name_for_prompt, label_map
from nnunetv2_dsm.io import atomic
from nnunetv2_dsm.io.orientation import ORIENTATION_KEY
from nnunetv2_dsm.networks.diffugts import DiffuGTSNetwork
from nnunetv2_dsm.networks.diffugts_inpaint import refine
from nnunetv2_dsm.text import check_encoder_matches, get_text_encoder
from nnunetv2_dsm.text.anomaly_prompts import pair_embeddings, prompt_pair
from nnunetv2_dsm.text.spec import spec_hint

DIFFUGTS_DIR = "diffugts"
EXTRA_MAPS = ("attention", "residual", "pseudo_healthy")


class DiffuGTSPredictor(DSMPredictor):
    def __init__(self, prompts, text_encoder: str | None = None, device: torch.device = torch.device("cuda"),
                 allow_tqdm: bool = True, threshold: float = 0.5, inpaint_steps: int = 25, batch_slices: int = 8,
                 seed: int = 0) -> None:
        super().__init__(prompts, text_encoder=text_encoder, use_mirroring=False, device=device, allow_tqdm=allow_tqdm)
        self.threshold, self.inpaint_steps, self.batch_slices, self.seed = threshold, inpaint_steps, batch_slices, seed

    def initialize_from_trained_model_folder(self, model_training_output_dir: str, use_folds, checkpoint_name: str =
                                             "checkpoint_final.pth") -> None:
        model_folder = Path(model_training_output_dir)
        if not (model_folder / "plans.json").is_file():
            raise DSMPredictionError(f"{model_folder} is not a trained nnU-Net model folder (no plans.json)")
        folds = [use_folds] if isinstance(use_folds, (int, str)) else use_folds
        if folds is None:
            folds = sorted(p.name.removeprefix("fold_") for p in model_folder.glob("fold_*")
                           if (p / checkpoint_name).is_file())
        if len(folds) != 1:
            raise DSMPredictionError(f"{model_folder}: DiffuGTS predicts with one fold's model; pass -f with one of "
                                     f"{folds or 'its folds (none has ' + checkpoint_name + ')'}")
        fold = folds[0] if folds[0] == "all" else int(folds[0])
        checkpoint = model_folder / f"fold_{fold}" / checkpoint_name
        if not checkpoint.is_file():
            raise DSMPredictionError(f"{checkpoint} does not exist: train the model, or pass --checkpoint / -f")
        nnUNetPredictor.initialize_from_trained_model_folder(self, str(model_folder), (fold,), checkpoint_name)
        self.configuration_name = model_folder.resolve().name.split("__")[-1]
        network = _unwrap(self.network)
        if not isinstance(network, DiffuGTSNetwork):
            raise DSMPredictionError(f"{model_folder} holds a {type(network).__name__}, not a DiffuGTS model "
                                     "(DiffuGTSTrainer); use `nnunetv2_dsm predict` for DSM models")
        network.load_state_dict(self.list_of_parameters[0])
        network.eval()
        record = self._text_record(model_folder / f"fold_{fold}", checkpoint_name)
        encoder = get_text_encoder(self.text_encoder_spec or record.get("encoder_spec") or spec_hint(record["encoder_id"]))
        check_encoder_matches(record["encoder_id"], encoder)
        self.encoder_id = encoder.encoder_id
        self.pairs = pair_embeddings(encoder, [class_name_for_prompt(p) for p in self.prompts]).to(self.device)
        self.diffugts = network.to(self.device)
        dataset = DSMDataset.from_json(self.dataset_json, model_folder / "dataset.json")
        self.training_orientation = self.plans_manager.plans.get(ORIENTATION_KEY) or dataset.orientation
        intensity = self.plans_manager.foreground_intensity_properties_per_channel.get("0", {})
        self.intensity = (float(intensity.get("mean", 0.0)), float(intensity.get("std", 1.0)))

    @torch.no_grad()
    def predict_logits_from_preprocessed_data(self, data: Tensor) -> Tensor:
        """Channels (4P, Z, Y, X): refined, attention, residual, pseudo-healthy (normalised) per prompt."""
        # data: (1, Z, Y, X) preprocessed -> (4P, Z, Y, X)
        net = self.diffugts
        slices = data[0].float()
        height, width = slices.shape[1:]
        pad = [(-s) % net.divisor for s in (height, width)]
        fill = float(slices.min())
        num = self.pairs.shape[0]
        out = torch.zeros(4 * num, *slices.shape)
        for start in range(0, slices.shape[0], self.batch_slices):
            x = slices[start:start + self.batch_slices, None].to(self.device)
            x = F.pad(x, (0, pad[1], 0, pad[0]), value=fill)
            probability = torch.sigmoid(net.anomaly_logits(x, self.pairs))
            for i in range(num):
                healthy = net.pair_tokens(self.pairs[i:i + 1, :1])
                result = refine(net, x, probability[:, i:i + 1], healthy, self.threshold, self.inpaint_steps, self.seed)
                maps = (result.refined, probability[:, i:i + 1], result.residual, result.pseudo_healthy[:, :1])
                for k, m in enumerate(maps):
                    out[k * num + i, start:start + x.shape[0]] = m[:, 0, :height, :width].cpu()
        return out

    def _output_paths(self, output_folder: Path, case: str) -> list[Path]:
        extra = output_folder / DIFFUGTS_DIR
        extra.mkdir(parents=True, exist_ok=True)
        return [output_folder / f"{case}.nii.gz", *[output_folder / SCORES_DIR / f"{case}_{s}.nii.gz" for s in self.slugs],
                *[extra / f"{case}_{s}_{m}.nii.gz" for m in EXTRA_MAPS for s in self.slugs]]

    def _export(self, logits: Tensor, properties: dict, targets: list[Path], grid: dict | None = None) -> None:
        # logits: (4P, *S_preprocessed) maps (see predict_logits_from_preprocessed_data)
        num = len(self.slugs)
        maps = self._resample(logits, properties)
        mean, std = self.intensity
        maps[3 * num:] = maps[3 * num:] * std + mean  # the pseudo-healthy image in the input's intensities
        labels = label_map(maps[:num], [True] * num)
        self._write_volumes([labels.numpy(), *maps.numpy()], properties, targets, grid)

    def _write_prompts_json(self, output_folder: Path) -> None:
        info = {
            "method": "DiffuGTS method, diffusion model trained here (not the authors' weights)",
            "labels": {"background": 0, **{s: i + 1 for i, s in enumerate(self.slugs)}},
            "prompts": [{"id": i + 1, "prompt": p, "slug": s, "healthy_text": prompt_pair(class_name_for_prompt(p))[0],
                         "abnormal_text": prompt_pair(class_name_for_prompt(p))[1],
                         "probability_map": f"{SCORES_DIR}/<case>_{s}.nii.gz",
                         **{m: f"{DIFFUGTS_DIR}/<case>_{s}_{m}.nii.gz" for m in EXTRA_MAPS}}
                        for i, (p, s) in enumerate(zip(self.prompts, self.slugs))],
            "threshold": self.threshold, "inpaint_steps": self.inpaint_steps,
            "trainer": self.trainer_name, "text_encoder": self.encoder_id,
        }
        atomic.write_json(output_folder / "prompts.json", info)
