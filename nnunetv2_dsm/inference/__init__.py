"""DSM prediction: open-vocabulary text prompts and anomaly maps on top of nnU-Net's predictor."""

from nnunetv2_dsm.inference.predictor import DSMPredictor
from nnunetv2_dsm.inference.prompts import DSMPredictionError, prompt_slug

__all__ = ["DSMPredictionError", "DSMPredictor", "prompt_slug"]
