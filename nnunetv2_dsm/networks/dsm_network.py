"""DSM stage-1 network: ResEnc backbone, pixel decoder, organ queries refined by kMMM layers.

Built by nnU-Net's ``get_network_from_plans`` from ResEnc arch_kwargs plus the DSM keys. One query
per queried class (sigmoid multi-label): every foreground class, or with ``query_channels`` only those
output channels (the DSM trainers pass the organ channels, so tumours have no stage-1 query and reach the
output only through stage 2's tumour queries and the text). Outputs are logits over all classes; a
channel without a query holds the constant ``NO_QUERY_LOGIT``. The network applies no sigmoid.
"""

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.initialization.weight_init import (
    InitWeights_He,
    init_last_bn_before_add_to_0,
)
from torch import nn

from nnunetv2_dsm.networks.backbone import DSMPixelDecoder, feature_level_stages, num_feature_levels
from nnunetv2_dsm.networks.heads import ClassHead
from nnunetv2_dsm.networks.kmmm import KMMMLayer

# Logit of an output channel that has no query: sigmoid = 9e-14, finite so that a masked-out loss term
# stays 0 (never 0 * inf).
NO_QUERY_LOGIT = -30.0


class LazyExtras(Mapping[str, Any]):
    """Read-only mapping of forward extras; ``lazy`` entries are computed on first access and cached.

    The pixel embedding E (query_dim channels at full resolution) is the largest tensor of the
    network, and training losses do not use it, so it is only formed when someone reads it. It is
    computed under the autograd/autocast context active at that moment.
    """

    def __init__(self, values: dict[str, Any], lazy: dict[str, Callable[[], Any]]) -> None:
        self._values = dict(values)
        self._lazy = dict(lazy)
        self._keys = [*values, *lazy]

    def __getitem__(self, key: str) -> Any:
        if key not in self._values and key in self._lazy:
            self._values[key] = self._lazy.pop(key)()
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class DSMNetwork(nn.Module):
    """ResEnc encoder + UNet pixel decoder + kMMM query decoder with mask and class heads.

    ``forward(x)`` returns the (B, num_classes, *spatial) mask logits ``s cos(W Q_final, E) + b``
    (``heads.NormalisedMaskProduct``), or, when
    ``deep_supervision`` is set, ``[final, M_finest, ..., M_coarsest]`` where M are the kMMM layers'
    post-SSM mask logits at their level's resolution (see ``deep_supervision_stages``).
    ``forward(x, return_extras=True)`` returns ``(output, extras)``, extras a read-only mapping with
    ``queries`` (B, N, C), ``class_logits`` (B, N), ``responses`` (per-layer M_l, coarse to fine),
    ``pixel_embedding`` E (B, C_0, *spatial; the L2-normalised last decoder stage) and ``features`` (multi-scale F_l, coarse to fine).
    """

    def __init__(
        self,
        input_channels: int,
        num_classes: int,
        n_stages: int,
        features_per_stage: int | list[int] | tuple[int, ...],
        conv_op: type[nn.Module],
        kernel_sizes: int | list | tuple,
        strides: int | list | tuple,
        n_blocks_per_stage: int | list[int] | tuple[int, ...],
        n_conv_per_stage_decoder: int | list[int] | tuple[int, ...],
        conv_bias: bool = False,
        norm_op: type[nn.Module] | None = None,
        norm_op_kwargs: dict | None = None,
        dropout_op: type[nn.Module] | None = None,
        dropout_op_kwargs: dict | None = None,
        nonlin: type[nn.Module] | None = None,
        nonlin_kwargs: dict | None = None,
        deep_supervision: bool = False,
        num_kmmm_layers: int = 4,
        query_dim: int = 128,
        ssm_d_state: int = 16,
        ssm_expand: int = 2,
        ssm_bidirectional: bool = True,
        use_kmeans: bool = True,
        use_ssm: bool = True,
        ffn_dim: int = 256,
        num_heads: int = 8,
        kmeans_void: bool = False,
        update_queries: bool = True,
        background_query: bool = False,
        update_dropout: float = 0.0,
        query_channels: list[int] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"DSMNetwork needs at least one foreground class (num_classes={num_classes}).")
        if isinstance(n_blocks_per_stage, int):
            n_blocks_per_stage = [n_blocks_per_stage] * n_stages
        if isinstance(n_conv_per_stage_decoder, int):
            n_conv_per_stage_decoder = [n_conv_per_stage_decoder] * (n_stages - 1)
        num_levels = num_feature_levels(n_stages, num_kmmm_layers)
        self.n_stages = n_stages
        self.num_classes = num_classes
        self.num_kmmm_layers = num_kmmm_layers
        self.query_dim, self.num_heads, self.ffn_dim = query_dim, num_heads, ffn_dim
        # Same attribute names as ResidualEncoderUNet so ResEnc checkpoints map onto encoder/decoder.
        self.key_to_encoder = "encoder.stages"
        self.key_to_stem = "encoder.stem"
        self.keys_to_in_proj = ("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0")
        self.encoder = ResidualEncoder(
            input_channels,
            n_stages,
            features_per_stage,
            conv_op,
            kernel_sizes,
            strides,
            n_blocks_per_stage,
            conv_bias,
            norm_op,
            norm_op_kwargs,
            dropout_op,
            dropout_op_kwargs,
            nonlin,
            nonlin_kwargs,
            return_skips=True,
        )
        self.decoder = DSMPixelDecoder(
            self.encoder, query_dim, num_levels, n_conv_per_stage_decoder, deep_supervision=deep_supervision
        )
        # With a background query, every class mask is relative to it: logit_c = m_c - m_bg.
        self.background_query = background_query
        queried = list(range(num_classes)) if query_channels is None else [int(c) for c in query_channels]
        if not queried or any(not 0 <= c < num_classes for c in queried) or len(set(queried)) != len(queried):
            raise ValueError(
                f"query_channels must be distinct output channels in [0, {num_classes}) and not empty, got "
                f"{query_channels}: list the classes that get a stage-1 query (None = all)."
            )
        # Identity when every class has a query: outputs keep their shape and old checkpoints load.
        self.query_channels = None if queried == list(range(num_classes)) else queried
        self.num_stage1_queries = len(queried)
        num_queries = len(queried) + int(background_query)
        self.queries = nn.Embedding(num_queries, query_dim)
        self.kmmm_layers = nn.ModuleList(
            [
                KMMMLayer(
                    num_queries,
                    query_dim,
                    num_heads=num_heads,
                    ffn_dim=ffn_dim,
                    ssm_d_state=ssm_d_state,
                    ssm_expand=ssm_expand,
                    ssm_bidirectional=ssm_bidirectional,
                    use_kmeans=use_kmeans,
                    use_ssm=use_ssm,
                    kmeans_void=kmeans_void,
                    update_queries=update_queries,
                    update_dropout=update_dropout,
                )
                for _ in range(num_levels)
            ]
        )
        self.class_head = ClassHead(query_dim)

    @property
    def deep_supervision(self) -> bool:
        # Stored on the decoder because nnU-Net's trainer toggles ``network.decoder.deep_supervision``.
        return self.decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        self.decoder.deep_supervision = enabled

    @staticmethod
    def deep_supervision_stages(n_stages: int, num_kmmm_layers: int) -> list[int]:
        """Encoder stage whose resolution each deep-supervision output has, in output order."""
        return [0] + feature_level_stages(n_stages, num_kmmm_layers)[::-1]

    def forward(
        self, x: torch.Tensor, return_extras: bool = False
    ) -> torch.Tensor | list[torch.Tensor] | tuple[Any, LazyExtras]:
        # x: (B, C_in, *S) -> (B, N, *S) | [(B, N, *S), (B, N, *S_l) fine to coarse] (+ extras)
        features, last_stage = self.decoder(self.encoder(x))
        q = self.queries.weight.unsqueeze(0).expand(x.shape[0], -1, -1)
        responses = []
        # Without deep supervision only the final masks carry a loss: the k-means argmax then passes a
        # straight-through gradient so the mask logits and the SSM still train.
        straight_through = not self.deep_supervision and torch.is_grad_enabled()
        for layer, f in zip(self.kmmm_layers, features):
            q, m = layer(q, f, straight_through)
            responses.append(self.relative_to_background(m))
        final = self.to_classes(self.relative_to_background(self.decoder.pixel_proj(q, last_stage)))
        responses = [self.to_classes(m) for m in responses]
        output = [final, *responses[::-1]] if self.deep_supervision else final
        if not return_extras:
            return output
        background, q = (q[:, :1], q[:, 1:]) if self.background_query else (None, q)
        extras = LazyExtras(
            {"queries": q, "background_query": background, "class_logits": self.to_classes(self.class_head(q)),
             "responses": responses, "features": features},
            {"pixel_embedding": lambda: self.decoder.pixel_embedding(last_stage)},
        )
        return output, extras

    def relative_to_background(self, masks: torch.Tensor) -> torch.Tensor:
        """Class mask logits ``m_c - m_bg`` with a background query (query 0), else the masks as they are."""
        # masks: (B, N(+1), *S) -> (B, N, *S)
        return masks[:, 1:] - masks[:, :1] if self.background_query else masks

    def to_classes(self, per_query: torch.Tensor) -> torch.Tensor:
        """Per-query logits in output-channel order; channels without a query get ``NO_QUERY_LOGIT``."""
        # per_query: (B, Nq, *S) -> (B, K, *S)
        if self.query_channels is None:
            return per_query
        out = per_query.new_full((per_query.shape[0], self.num_classes, *per_query.shape[2:]), NO_QUERY_LOGIT)
        out[:, self.query_channels] = per_query
        return out

    @property
    def queried(self) -> torch.Tensor:
        """(K,) bool: the output channels that have a stage-1 query."""
        mask = torch.zeros(self.num_classes, dtype=torch.bool)
        mask[self.query_channels if self.query_channels is not None else slice(None)] = True
        return mask

    def compute_conv_feature_map_size(self, input_size: list[int] | tuple[int, ...]) -> np.int64:
        """Activation count estimate for nnU-Net's VRAM heuristics (input_size without channels)."""
        size = self.encoder.compute_conv_feature_map_size(input_size)
        size += self.decoder.compute_conv_feature_map_size(input_size)
        return size + np.prod([self.num_classes, *input_size], dtype=np.int64)

    @staticmethod
    def initialize(module: nn.Module) -> None:
        InitWeights_He(1e-2)(module)
        init_last_bn_before_add_to_0(module)
