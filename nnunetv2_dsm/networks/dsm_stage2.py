"""DSM stage-2 network: stage-1 DSM plus tumour queries, AMVP, DQR and text-aligned open-vocabulary output.

The stage-1 part (encoder, pixel decoder, one query per organ class, ``query_channels``, refined by the
kMMM layers) keeps its parameter names and shapes. Everything stage 2 adds lives under ``stage2.seg_layers``: nnU-Net's
``load_pretrained_weights`` (``nnUNetv2_train -pretrained_weights``) requires every key of the new
network to exist with the same shape in the checkpoint, except keys containing ``.seg_layers.`` (the
task-specific heads it re-initialises when fine-tuning). Naming the stage-2 heads that way lets a
stage-1 checkpoint initialise the stage-1 part through the stock command while the stage-2 modules keep
their fresh initialisation. (A stage-2 checkpoint used as ``-pretrained_weights`` likewise transfers only
its stage-1 part.)

Per kMMM level l (coarse to fine), with F_l the level's feature and M_l the post-SSM responses:

1. AMVP prompt from the organ channels of M_l (``S = -max_n M_l,n``, min-max per case, ``S > 0.5``);
2. a DQR layer: guided diffusion of F_l (guide: the previous level's fused feature), masked
   cross-attention of the tumour queries restricted to the prompt, self-attention with the organ
   queries of that level, FFN.

Then masks m_q for all queries [stage-1 queries; tumour queries] from the pixel embedding, class
probabilities p_q(c) = softmax_c(cos(proj(q), t_c) / tau) over the K text embeddings t and a learned
no-object embedding t_0 (a query that matches no class drops out), and the output
``semantic_logits(m, p)`` (B, K, *S), the logits of P_c = sum_q p_q(c) sigmoid(m_q); nnU-Net applies
the sigmoid. With prompts set (``set_prompts``) the output has one channel per prompt instead, each
prompt scored against the trained classes and no-object (``alignment.prompt_probabilities``).
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from nnunetv2_dsm.networks.alignment import (
    TextAlignmentHead,
    class_probabilities,
    prompt_probabilities,
    semantic_logits,
)
from nnunetv2_dsm.networks.amvp import AnomalyMaskPrompt
from nnunetv2_dsm.networks.dqr import DQRLayer
from nnunetv2_dsm.networks.dsm_network import DSMNetwork, LazyExtras

# Settings stage 2 adds to the DSM decoder arch_kwargs (paper: 20 tumour queries, tau = 0.01).
STAGE2_DEFAULTS: dict[str, Any] = {
    "num_tumour_queries": 20,
    "text_dim": 384,
    "temperature": 0.01,
    "dqr_steps": 3,
    "use_amvp": True,
    "use_dqr": True,
    "use_text": True,
    "organ_channels": None,
}


class PlainFeature(nn.Module):
    """Stands in for the guided diffusion in the no-DQR ablation: key/value is the plain feature."""

    def forward(self, f: Tensor, guide: Tensor | None = None) -> Tensor:
        # f: (B, C, *S) -> (B, C, *S)
        return f


class TumourQueryDecoder(nn.Module):
    """The modules stage 2 adds: tumour queries, AMVP, one DQR layer per level, text alignment.

    Buffers: ``text_embeddings`` (K, text_dim) of the trained classes, persistent (saved with the
    weights, set from the text encoder by the trainer); ``prompt_embeddings`` (P, text_dim), not
    persistent, the prompts of an open-vocabulary prediction (``set_prompts``); and
    ``organ_index`` (indices of the stage-1 channels that are organs, not persistent: it comes from the
    plans). With ``use_text=False`` learned class embeddings replace the text (the ``_noCLIP`` ablation).
    """

    def __init__(
        self,
        num_classes: int,
        num_levels: int,
        query_dim: int,
        num_tumour_queries: int,
        text_dim: int,
        temperature: float,
        dqr_steps: int,
        num_heads: int,
        ffn_dim: int,
        use_amvp: bool,
        use_dqr: bool,
        use_text: bool,
        organ_channels: Sequence[int] | None,
    ) -> None:
        super().__init__()
        if num_tumour_queries < 1:
            raise ValueError(f"num_tumour_queries must be >= 1 (got {num_tumour_queries}): fix arch_kwargs.")
        organ = list(range(num_classes)) if organ_channels is None else [int(c) for c in organ_channels]
        if not organ or any(not 0 <= c < num_classes for c in organ) or len(set(organ)) != len(organ):
            raise ValueError(
                f"organ_channels must be distinct channel indices in [0, {num_classes}) and not empty, got "
                f"{organ_channels}: list the stage-1 output channels that are organ classes (None = all)."
            )
        self.use_amvp = use_amvp
        self.use_text = use_text
        self.queries = nn.Embedding(num_tumour_queries, query_dim)
        self.amvp = AnomalyMaskPrompt()
        self.dqr_layers = nn.ModuleList(
            [
                DQRLayer(query_dim, None, num_heads=num_heads, ffn_dim=ffn_dim, diffusion_steps=dqr_steps)
                for _ in range(num_levels)
            ]
        )
        if not use_dqr:
            for layer in self.dqr_layers:
                layer.diffusion = PlainFeature()
        self.alignment = TextAlignmentHead(query_dim, text_dim, temperature)
        self.register_buffer("text_embeddings", torch.zeros(num_classes, text_dim))
        self.register_buffer("prompt_embeddings", None, persistent=False)
        self.prompt_trained_index: list[int] = []
        self.class_embeddings = nn.Parameter(torch.randn(num_classes, text_dim)) if not use_text else None
        # MaskFormer's "no object" class, as one more embedding the queries are compared to.
        self.no_object = nn.Parameter(torch.randn(1, text_dim))
        self.register_buffer("organ_index", torch.tensor(organ, dtype=torch.long), persistent=False)

    def class_vectors(self) -> Tensor:
        """Class embeddings the queries are compared to: (K, text_dim)."""
        return self.text_embeddings if self.class_embeddings is None else self.class_embeddings


class DSMStage2Network(DSMNetwork):
    """DSM stage 2; see the module docstring.

    ``forward(x)`` returns ``semantic`` (B, K, *S) logits, or with deep supervision
    ``[semantic, stage-1 final (B, K, *S), stage-1 responses fine to coarse]``. With ``export_anomaly``
    set (off by default, so ``nnUNetv2_predict`` sees K channels) one more channel is appended to the
    non-deep-supervision output: the anomaly score ``S = -max`` over the organ channels of the stage-1
    final logits at full resolution. S is itself a logit (``sigmoid(S) = 1 - max_n sigmoid(l_n)``, the
    probability of no known organ) and is left unnormalised so that sliding-window tiles can be
    averaged; the per-case min-max normalisation happens once the whole case is stitched
    (``nnunetv2_dsm.inference.predictor``).
    """

    def __init__(
        self,
        input_channels: int,
        num_classes: int,
        *stage1_args: Any,
        num_tumour_queries: int = STAGE2_DEFAULTS["num_tumour_queries"],
        text_dim: int = STAGE2_DEFAULTS["text_dim"],
        temperature: float = STAGE2_DEFAULTS["temperature"],
        dqr_steps: int = STAGE2_DEFAULTS["dqr_steps"],
        use_amvp: bool = STAGE2_DEFAULTS["use_amvp"],
        use_dqr: bool = STAGE2_DEFAULTS["use_dqr"],
        use_text: bool = STAGE2_DEFAULTS["use_text"],
        organ_channels: list[int] | None = STAGE2_DEFAULTS["organ_channels"],
        **stage1_kwargs: Any,
    ) -> None:
        # Stage 1's constructor with its own arguments (DSMNetwork); stage 2 only adds the keywords above.
        super().__init__(input_channels, num_classes, *stage1_args, **stage1_kwargs)
        self.export_anomaly = False
        # ModuleDict only to give the stage-2 keys the ``.seg_layers.`` infix (module docstring).
        self.stage2 = nn.ModuleDict(
            {
                "seg_layers": TumourQueryDecoder(
                    num_classes, len(self.kmmm_layers), self.query_dim, num_tumour_queries, text_dim, temperature,
                    dqr_steps, self.num_heads, self.ffn_dim, use_amvp, use_dqr, use_text, organ_channels,
                )
            }
        )

    @property
    def tumour_decoder(self) -> TumourQueryDecoder:
        return self.stage2["seg_layers"]

    @staticmethod
    def deep_supervision_stages(n_stages: int, num_kmmm_layers: int) -> list[int]:
        """Encoder stage of each deep-supervision output: the semantic output, then stage 1's outputs."""
        return [0] + DSMNetwork.deep_supervision_stages(n_stages, num_kmmm_layers)

    @property
    def num_prompt_classes(self) -> int:
        """Channels of the semantic output: the prompts when set, else the trained classes."""
        head = self.tumour_decoder
        return len(head.prompt_trained_index) if head.prompt_embeddings is not None else head.class_vectors().shape[0]

    def set_prompts(self, embeddings: Tensor, trained_index: list[int]) -> None:
        """Predict the prompts embedded as ``embeddings`` (P, text_dim) instead of the trained classes.

        ``trained_index[i]`` is the trained class prompt i names (its output is then that class's trained
        output), or -1 for a new name. ``clear_prompts`` returns to the trained classes.
        """
        head = self.tumour_decoder
        self._check_text(embeddings)
        num_trained = head.class_vectors().shape[0]
        if len(trained_index) != embeddings.shape[0] or any(not -1 <= i < num_trained for i in trained_index):
            raise ValueError(f"trained_index must give, for each of the {embeddings.shape[0]} prompts, a trained "
                             f"class in [0, {num_trained}) or -1, got {trained_index}")
        head.prompt_embeddings = embeddings.detach().to(head.text_embeddings.device, torch.float32).clone()
        head.prompt_trained_index = [int(i) for i in trained_index]

    def clear_prompts(self) -> None:
        self.tumour_decoder.prompt_embeddings = None
        self.tumour_decoder.prompt_trained_index = []

    def _check_text(self, embeddings: Tensor) -> None:
        head = self.tumour_decoder
        if head.class_embeddings is not None:
            raise ValueError(
                "this DSM stage-2 model was trained without text alignment (use_text=False, the _noCLIP "
                "ablation): its classes are learned vectors, so it cannot take text prompts."
            )
        dim = head.alignment.text_dim
        if embeddings.ndim != 2 or embeddings.shape[0] < 1 or embeddings.shape[1] != dim:
            raise ValueError(
                f"text embeddings must be (K >= 1, {dim}), got {tuple(embeddings.shape)}: embed the prompts "
                "with the text encoder the model was trained with."
            )

    def set_text_embeddings(self, embeddings: Tensor) -> None:
        """Set the trained class set's embeddings (K', text_dim) (the trainer does, from its text encoder)."""
        head = self.tumour_decoder
        self._check_text(embeddings)
        head.text_embeddings = embeddings.detach().to(head.text_embeddings.device, torch.float32).clone()

    def forward(
        self, x: Tensor, return_extras: bool = False
    ) -> Tensor | list[Tensor] | tuple[Any, LazyExtras]:
        # x: (B, C_in, *S) -> (B, K or P (+1), *S) | [(B, K, *S), (B, K, *S), (B, K, *S_l) fine to coarse] (+ extras)
        head = self.tumour_decoder
        features, last_stage = self.decoder(self.encoder(x))
        q = self.queries.weight.unsqueeze(0).expand(x.shape[0], -1, -1)
        tumour = head.queries.weight.unsqueeze(0).expand(x.shape[0], -1, -1)
        responses = []
        guide = None
        straight_through = not self.deep_supervision and torch.is_grad_enabled()  # as in DSMNetwork.forward
        for level, (kmmm, dqr, f) in enumerate(zip(self.kmmm_layers, head.dqr_layers, features)):
            q, m = kmmm(q, f, straight_through)
            m = self.to_classes(self.relative_to_background(m))
            responses.append(m)
            prompt = head.amvp(m[:, head.organ_index], f.shape[2:], level)[1] if head.use_amvp else None
            tumour, _, guide = dqr(tumour, q[:, int(self.background_query):], f, guide, prompt)
        # With a background query (query 0) every mask, the tumour queries' too, is relative to it.
        masks = self.relative_to_background(self.decoder.pixel_proj(torch.cat([q, tumour], dim=1), last_stage))
        q = q[:, int(self.background_query):]
        all_queries = torch.cat([q, tumour], dim=1)
        final = self.to_classes(masks[:, : self.num_stage1_queries])
        class_logits = head.alignment(all_queries, head.class_vectors())
        no_object_logits = head.alignment(all_queries, head.no_object)
        if head.prompt_embeddings is not None and not self.deep_supervision:
            probs = prompt_probabilities(class_logits, no_object_logits,
                                         head.alignment(all_queries, head.prompt_embeddings), head.prompt_trained_index)
        else:
            probs = class_probabilities(class_logits, no_object_logits)
        exporting = self.export_anomaly and not self.deep_supervision
        if exporting:
            anomaly = -final[:, head.organ_index].amax(dim=1, keepdim=True)
        # Prediction needs neither the mask logits nor their gradient after the mixture.
        predicting = not (self.deep_supervision or return_extras or (torch.is_grad_enabled() and masks.requires_grad))
        semantic = semantic_logits(masks, probs, overwrite_masks=predicting)
        if self.deep_supervision:
            output = [semantic, final, *responses[::-1]]
        elif exporting:
            output = torch.cat([semantic, anomaly.to(semantic.dtype)], dim=1)
        else:
            output = semantic
        if not return_extras:
            return output
        extras = LazyExtras(
            {
                "queries": q,
                "class_logits": self.to_classes(self.class_head(q)),
                "responses": responses,
                "features": features,
                "tumour_queries": tumour,
                "text_class_logits": class_logits,
                "no_object_logits": no_object_logits,
                "stage1_logits": final,
            },
            {"pixel_embedding": lambda: self.decoder.pixel_embedding(last_stage)},
        )
        return output, extras
