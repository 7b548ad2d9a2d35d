"""DSM prediction: open-vocabulary text prompts and anomaly maps on top of nnU-Net's predictor."""

from nnunetv2_dsm.inference.predictor import DSMPredictionError, DSMPredictor, prompt_slug

__all__ = ["DSMPredictionError", "DSMPredictor", "prompt_slug"]
