"""Where a stage-2 model keeps the text it was trained with (encoder, class names, prompts, embeddings).

The trainer writes them beside its checkpoints and into them; the predictor reads them back to check
that prompts at prediction time are encoded by the same encoder.
"""

TEXT_CHECKPOINT_KEY = "dsm_text"  # entry in every stage-2 checkpoint
TEXT_JSON = "dsm_text.json"  # fold folder: encoder id and spec, class names, prompts
TEXT_EMBEDDINGS = "dsm_text_embeddings.pt"  # fold folder: (K, D) class embeddings
