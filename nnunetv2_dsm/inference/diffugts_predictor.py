"""DiffuGTS prediction (DiffuGTS method, diffusion model trained here) with DSM's prompt interface.

``nnunetv2_dsm diffugts-predict -i IN -o OUT -m MODEL --prompts "spleen tumor" ...`` reads, checks,
reorients and preprocesses like ``nnunetv2_dsm predict`` (``DSMPredictor``), then works on whole slices
(no sliding window: the refinement inpaints a slice at a time). Per prompt: the anomaly-aware attention
map of the prompt's (healthy, abnormal) pair gives p on every slice; the candidate region is inpainted
from the healthy prompt (``networks.diffugts_inpaint``) and the residual refines p. The candidate region
is where p exceeds ``threshold`` times the case's highest p for that prompt (``threshold_mode
"relative"``, the default: attention maps are read relative to their peak, as min-max normalised maps
are, so a case always gets candidates and the residual decides which are lesions), or ``threshold``
itself (``"absolute"``). With ``regions`` (a folder of ``<case>.nii.gz`` masks on the images' grids) the
masks are inpainted instead, for the pseudo-healthy image of a known lesion. Written in the input
geometry:

- ``scores/<case>_<prompt>.nii.gz``: the refined probability;
- ``diffugts/<case>_<prompt>_attention.nii.gz``: p before refinement;
- ``diffugts/<case>_<prompt>_residual.nii.gz``: the pixel + feature residual in [0, 1);
- ``diffugts/<case>_<prompt>_pseudo_healthy.nii.gz``: the pseudo-healthy image, in the input's intensities
  (nnU-Net's CT normalisation undone);
- ``<case>.nii.gz``: label ids where a refined probability exceeds 0.5 (written last), and ``prompts.json``.
"""

from pathlib import Path

import SimpleITK as sitk
import torch
import torch.nn.functional as F
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from torch import Tensor

from nnunetv2_dsm.dataset import DSMDataset
from nnunetv2_dsm.errors import InputError, raise_input_errors
from nnunetv2_dsm.inference.predictor import DSMPredictor
from nnunetv2_dsm.inference.prompts import SCORES_DIR, DSMPredictionError, class_name_for_prompt, label_map
from nnunetv2_dsm.io import atomic
from nnunetv2_dsm.io.orientation import ORIENTATION_KEY
from nnunetv2_dsm.networks.diffugts import DiffuGTSNetwork
from nnunetv2_dsm.networks.diffugts_inpaint import refine
from nnunetv2_dsm.networks.unwrap import uncompiled
from nnunetv2_dsm.text import check_encoder_matches, get_text_encoder
from nnunetv2_dsm.text.anomaly_prompts import pair_embeddings, prompt_pair
from nnunetv2_dsm.text.spec import spec_hint

DIFFUGTS_DIR = "diffugts"
EXTRA_MAPS = ("attention", "residual", "pseudo_healthy")
THRESHOLD_MODES = ("relative", "absolute")
# The inpainting starts from the image noised to a quarter of the schedule: AnoDDPM's partial diffusion
# (Wyatt et al., CVPRW 2022, lambda = 250 of T = 1000), which keeps the anatomy and replaces what the
# denoiser reads as noise at that level; from pure noise (1.0) a model trained on a few patients
# generates the region with no regard to the tissue around it.
DEFAULT_STRENGTH = 0.25


class DiffuGTSPredictor(DSMPredictor):
    def __init__(self, prompts, text_encoder: str | None = None, device: torch.device = torch.device("cuda"),
                 allow_tqdm: bool = True, threshold: float = 0.5, inpaint_steps: int = 25, batch_slices: int = 8,
                 seed: int = 0, threshold_mode: str = "relative", regions: str | Path | None = None,
                 strength: float = DEFAULT_STRENGTH) -> None:
        if threshold_mode not in THRESHOLD_MODES:
            raise DSMPredictionError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {threshold_mode!r}")
        super().__init__(prompts, text_encoder=text_encoder, use_mirroring=False, device=device, allow_tqdm=allow_tqdm)
        self.threshold, self.inpaint_steps, self.batch_slices, self.seed = threshold, inpaint_steps, batch_slices, seed
        self.threshold_mode, self.strength = threshold_mode, strength
        self.regions = None if regions is None else Path(regions)
        self._region: Tensor | None = None  # the current case's preprocessed region mask, with ``regions``

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
        network = uncompiled(self.network)
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

    # ---- known regions (``regions``) ------------------------------------------------------------------
    def predict_folder(self, input_folder: str | Path, output_folder: str | Path) -> list[str]:
        if self.regions is not None:
            self._check_regions(Path(input_folder))
        return super().predict_folder(input_folder, output_folder)

    def _region_file(self, case: str) -> Path:
        return self.regions / f"{case}{self.dataset_json['file_ending']}"

    def _check_regions(self, input_folder: Path) -> None:
        """Every case has a region mask on its image's grid; all problems are reported before any prediction."""
        ending = self.dataset_json["file_ending"]
        problems = []
        for image in sorted(input_folder.glob(f"*_0000{ending}")):
            mask = self._region_file(image.name[: -len(f"_0000{ending}")])
            if not mask.is_file():
                problems.append(InputError(mask, "the region mask of this case is missing.",
                                           f"write <case>{ending} masks (non-zero = inpaint) for every input case into "
                                           f"{self.regions}, or leave out --regions"))
                continue
            sizes = []
            for path in (image, mask):
                reader = sitk.ImageFileReader()
                reader.SetFileName(str(path))
                reader.ReadImageInformation()
                sizes.append(reader.GetSize())
            if sizes[0] != sizes[1]:
                problems.append(InputError(mask, f"the region mask has size {sizes[1]}, its image {image} {sizes[0]}.",
                                           "resample the mask onto the image's grid (nearest neighbour)"))
        raise_input_errors(problems)

    def _preprocess_case(self, preprocessor, case: str, files: list[str], mask=None):
        if self.regions is None:
            return super()._preprocess_case(preprocessor, case, files, mask)
        data, seg, properties, grid = super()._preprocess_case(preprocessor, case, files, self._region_file(case))
        self._region = torch.from_numpy(seg[0] > 0)
        return data, seg, properties, grid

    # ---- maps ----------------------------------------------------------------------------------------
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
        batches = range(0, slices.shape[0], self.batch_slices)

        def batch(start: int) -> Tensor:
            return F.pad(slices[start:start + self.batch_slices, None].to(self.device), (0, pad[1], 0, pad[0]), value=fill)

        for start in batches:  # the attention maps of the whole case first: the relative threshold needs its peak
            probability = torch.sigmoid(net.anomaly_logits(batch(start), self.pairs))
            out[num:2 * num, start:start + probability.shape[0]] = probability[..., :height, :width].transpose(0, 1).cpu()
        peak = out[num:2 * num].flatten(1).amax(1)
        thresholds = peak * self.threshold if self.threshold_mode == "relative" else torch.full((num,), self.threshold)
        for start in batches:
            x = batch(start)
            region = None
            if self._region is not None:
                region = F.pad(self._region[start:start + x.shape[0], None].float(), (0, pad[1], 0, pad[0])).to(self.device) > 0
            for i in range(num):
                healthy = net.pair_tokens(self.pairs[i:i + 1, :1])
                probability = F.pad(out[num + i, start:start + x.shape[0], None], (0, pad[1], 0, pad[0])).to(self.device)
                result = refine(net, x, probability, healthy, float(thresholds[i]), self.inpaint_steps, self.seed, region,
                                self.strength)
                for k, m in ((0, result.refined), (2, result.residual), (3, result.pseudo_healthy[:, :1])):
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
            "threshold": self.threshold, "threshold_mode": self.threshold_mode,
            "regions": None if self.regions is None else str(self.regions), "inpaint_steps": self.inpaint_steps,
            "strength": self.strength,
            "trainer": self.trainer_name, "text_encoder": self.encoder_id,
        }
        atomic.write_json(output_folder / "prompts.json", info)
