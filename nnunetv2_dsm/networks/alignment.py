"""Class prompt alignment (DSM paper section 4.2.3, eq. 20) and MaskFormer semantic inference.

Query embeddings are linearly projected to the text space; both sides are L2-normalised and the
class logits of query q are ``cos(proj(q), t_c) / tau`` with tau = 0.01, so
``p_q(c) = softmax_c(cos / tau)``. Text embeddings t (K, D) are inputs: the network owns them as
buffers (any class name, seen or unseen, is a new row at predict time); nothing here encodes text.

A learned no-object embedding t_0 joins the K classes in the softmax (MaskFormer's "no object"
class), so a query that matches no class puts its mass there and drops out of every class map.

Semantic inference for class c (MaskFormer, Cheng et al. 2021):

    P_c(x) = sum_q p_q(c) * sigmoid(m_q(x))                       (``semantic_masks``)

a sum over queries, clipped to 1 where several queries claim the same class (``semantic_logits``
returns its logits, for ``binary_cross_entropy_with_logits``, the BCE form that mixed-precision
autocast accepts, and for nnU-Net, which applies the sigmoid).

Open vocabulary (``prompt_probabilities``): each prompt competes with the trained classes and
no-object, not with the other prompts, so a prompt's map does not depend on what else is asked; a
prompt that names a trained class takes that class's own column and reproduces its trained output.
With Z = logsumexp over the trained classes and no-object, a new prompt with logit l_p gets
p_q(p) = exp(l_p) / (exp(Z) + exp(l_p)) = sigmoid(l_p - Z).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def class_probabilities(class_logits: Tensor, no_object_logits: Tensor | None = None) -> Tensor:
    """p_q(c): softmax over the K classes (and no-object, whose column is dropped) of every query."""
    # class_logits: (B, Nq, K), no_object_logits: (B, Nq, 1) -> (B, Nq, K)
    if no_object_logits is None:
        return class_logits.softmax(dim=-1)
    return torch.cat([class_logits, no_object_logits], dim=-1).softmax(dim=-1)[..., :-1]


def prompt_probabilities(class_logits: Tensor, no_object_logits: Tensor, prompt_logits: Tensor,
                         trained_index: Sequence[int]) -> Tensor:
    """p_q(prompt) for every prompt, each against the trained classes and no-object (module docstring).

    ``trained_index[i]`` is the trained class prompt i names, or -1 for a new name.
    """
    # class_logits: (B, Nq, K), no_object_logits: (B, Nq, 1), prompt_logits: (B, Nq, P) -> (B, Nq, P)
    if len(trained_index) != prompt_logits.shape[-1]:
        raise ValueError(f"{prompt_logits.shape[-1]} prompts but {len(trained_index)} trained-class indices")
    with torch.autocast(class_logits.device.type, enabled=False):
        known = torch.cat([class_logits, no_object_logits], dim=-1).float()
        log_z = torch.logsumexp(known, dim=-1, keepdim=True)
        new = torch.sigmoid(prompt_logits.float() - log_z)
        index = torch.tensor([max(i, 0) for i in trained_index], device=known.device)
        trained = torch.exp(known.index_select(-1, index) - log_z)
        is_trained = torch.tensor([i >= 0 for i in trained_index], device=known.device)
        return torch.where(is_trained, trained, new)


def _check_semantic_inputs(mask_logits: Tensor, class_probs: Tensor) -> None:
    if (
        mask_logits.ndim < 3
        or class_probs.ndim != 3
        or mask_logits.shape[:2] != class_probs.shape[:2]
    ):
        raise ValueError(
            f"semantic inference expects mask_logits (B, Nq, *spatial) and class_probs (B, Nq, K) with the "
            f"same B and Nq, got {tuple(mask_logits.shape)} and {tuple(class_probs.shape)}."
        )


def semantic_masks(mask_logits: Tensor, class_probs: Tensor) -> Tensor:
    """MaskFormer semantic inference ``P_c(x) = sum_q p_q(c) sigmoid(m_q(x))`` (probabilities)."""
    # mask_logits: (B, Nq, *S), class_probs: (B, Nq, K) -> (B, K, *S)
    _check_semantic_inputs(mask_logits, class_probs)
    return torch.einsum("bqk,bq...->bk...", class_probs, torch.sigmoid(mask_logits))


def semantic_logits(mask_logits: Tensor, class_probs: Tensor, eps: float = 1e-6,
                    overwrite_masks: bool = False) -> Tensor:
    """Logits of P_c = sum_q p_q(c) sigmoid(m_q), clipped to [eps, 1 - eps] (module docstring).

    ``overwrite_masks=True`` (prediction, no gradients) lets float32 ``mask_logits`` be overwritten
    by their sigmoid, saving a copy of the largest tensor of the head.
    """
    # mask_logits: (B, Nq, *S), class_probs: (B, Nq, K) -> (B, K, *S)
    _check_semantic_inputs(mask_logits, class_probs)
    # float32: the mixture is a probability near 0 or 1 whose logit half precision cannot resolve.
    with torch.autocast(mask_logits.device.type, enabled=False):
        probs = class_probs.float()
        masks = mask_logits.float()
        masks = masks.sigmoid_() if overwrite_masks else torch.sigmoid(masks)
        mixture = torch.bmm(probs.transpose(1, 2), masks.flatten(2)).view(-1, probs.shape[2], *masks.shape[2:])
        return mixture.logit_(eps=eps) if overwrite_masks else torch.logit(mixture, eps=eps)


class TextAlignmentHead(nn.Module):
    """Cosine-similarity class logits between projected queries and text embeddings, ``cos / tau``.

    The temperature is fixed (0.01 in the paper), not learned: with unit vectors the logits lie in
    [-1/tau, 1/tau], so tau alone sets how sharp p_q(c) can get.
    """

    def __init__(self, query_dim: int, text_dim: int, temperature: float = 0.01) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"TextAlignmentHead temperature must be > 0, got {temperature}.")
        self.text_dim = text_dim
        self.temperature = temperature
        self.proj = nn.Linear(query_dim, text_dim)

    def forward(self, queries: Tensor, text_embeddings: Tensor) -> Tensor:
        # queries: (B, Nq, C), text_embeddings: (K, D) -> class logits (B, Nq, K)
        if text_embeddings.ndim != 2 or text_embeddings.shape[1] != self.text_dim:
            raise ValueError(
                f"TextAlignmentHead expects text embeddings (K, {self.text_dim}), got "
                f"{tuple(text_embeddings.shape)}: the text encoder must match the one the model was built with."
            )
        projected = self.proj(queries)
        # float32: at tau = 0.01 a half-precision cosine error of 1e-3 would move logits by 0.1.
        with torch.autocast(queries.device.type, enabled=False):
            q = F.normalize(projected.float(), dim=-1)
            t = F.normalize(text_embeddings.float(), dim=-1)
            return q @ t.t() / self.temperature

    def class_probabilities(self, queries: Tensor, text_embeddings: Tensor) -> Tensor:
        """p_q(c) = softmax_c(cos(proj(q), t_c) / tau)."""
        # queries: (B, Nq, C), text_embeddings: (K, D) -> (B, Nq, K)
        return class_probabilities(self(queries, text_embeddings))
