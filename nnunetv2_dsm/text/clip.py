"""CLIP text tower (open-clip-torch) from local weights, the encoder of the paper (ViT-B/32)."""

import hashlib
import os
from pathlib import Path

import torch

from nnunetv2_dsm import settings
from nnunetv2_dsm.errors import DSMError
from nnunetv2_dsm.text.base import TextEncoder
from nnunetv2_dsm.text.offline import hub_offline

DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_TAG = "laion2b_s34b_b79k"
WEIGHTS_ENV = settings.CLIP_WEIGHTS_VARIABLE
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz")


class MissingWeightsError(DSMError, FileNotFoundError):
    """No local CLIP weights; the message says how to supply them."""


def _how_to_supply(model_name: str, tag: str | None) -> str:
    import open_clip

    tag = tag or (DEFAULT_CLIP_TAG if model_name == DEFAULT_CLIP_MODEL else None)
    hub = open_clip.get_pretrained_cfg(model_name, tag).get("hf_hub", "") if tag else ""
    repo, filename = os.path.split(hub)
    filename = filename or "open_clip_pytorch_model.bin"
    where = (
        f"download {filename} of {model_name} tag {tag} (https://huggingface.co/{repo}/resolve/main/{filename}, "
        f"or `hf download {repo} {filename} --local-dir .`)"
        if repo
        else f"download the open_clip weights of {model_name} (see open_clip.list_pretrained_tags_by_model)"
    )
    return (
        f"This machine cannot download weights. On a machine with internet, {where}, copy the file here and "
        f"pass --text-encoder openclip:{model_name}:/path/to/{filename} or set the environment variable "
        f"{WEIGHTS_ENV}=/path/to/{filename}. A populated Hugging Face hub cache (HF_HUB_CACHE) also works "
        "with the tag instead of a path. Without CLIP weights use the offline default --text-encoder minilm, "
        "or a precomputed embeddings file --text-encoder file:/path/emb.pt (made with `nnunetv2_dsm embed`)."
    )


def _cached_tag_file(model_name: str, tag: str, cache_dir: str | None) -> Path | None:
    """Weights of a pretrained tag already on disk (Hugging Face hub cache or open_clip's URL cache).

    Looked up without any network call, unlike open_clip's own download path, which would try to fetch.
    """
    import open_clip
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)
        filename = filename or HF_WEIGHTS_NAME
        # open_clip prefers a safetensors sibling when the hub has one; mirror that order.
        candidates = [HF_SAFE_WEIGHTS_NAME] if filename == HF_WEIGHTS_NAME else []
        if filename.endswith((".bin", ".pth")) and filename != HF_WEIGHTS_NAME:
            candidates.append(filename[:-4] + ".safetensors")
        candidates.append(filename)
        for name in candidates:
            found = try_to_load_from_cache(repo_id=repo, filename=name, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    url = cfg.get("url", "")
    if url:
        url_file = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if url_file.is_file():
            return url_file
    return None


def resolve_clip_weights(
    model_name: str, weights: str | None, cache_dir: str | None = None
) -> tuple[Path, str]:
    """Local weight file for ``model_name`` and a description of where it came from.

    ``weights`` is a file path or a pretrained tag; when None, ``$DSM_CLIP_WEIGHTS`` and then the default
    tag are tried. Raises MissingWeightsError (with instructions) when nothing is on disk.
    """
    import open_clip

    if open_clip.get_model_config(model_name) is None:
        raise ValueError(
            f"unknown open_clip model {model_name!r}; built-in names include "
            f"{[m for m in open_clip.list_models() if m.startswith('ViT-B')]}"
        )
    source = weights or settings.clip_weights()
    origin = "argument" if weights else (f"${WEIGHTS_ENV}" if source else "default tag")
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if source is None:
        if not tags:
            raise MissingWeightsError(
                f"open_clip model {model_name} has no pretrained tag; pass a weight file. "
                + _how_to_supply(model_name, None)
            )
        source = DEFAULT_CLIP_TAG if DEFAULT_CLIP_TAG in tags else tags[0]

    path = Path(source).expanduser()
    if path.is_file():
        return path.resolve(), f"file {path} ({origin})"
    if source in tags:
        found = _cached_tag_file(model_name, source, cache_dir)
        if found is None:
            raise MissingWeightsError(
                f"No local weights for open_clip {model_name} tag {source!r} ({origin}): not in the Hugging Face "
                f"hub cache ({cache_dir or 'HF_HUB_CACHE'}) nor in the open_clip cache. "
                + _how_to_supply(model_name, source)
            )
        return found.resolve(), f"tag {source} from cache ({origin})"
    if path.suffix in _WEIGHT_SUFFIXES or os.sep in source:
        raise MissingWeightsError(
            f"CLIP weight file {path} ({origin}) does not exist. " + _how_to_supply(model_name, None)
        )
    raise ValueError(
        f"{source!r} ({origin}) is neither an existing weight file nor a pretrained tag of open_clip {model_name}; "
        f"tags: {tags}"
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class OpenCLIPEncoder(TextEncoder):
    """Text tower of an open_clip CLIP model loaded from a local file or a populated hub cache.

    The weights are located and hashed at construction (so a missing file fails at once, before any
    training starts); the model itself is loaded on the first ``encode``. ``encoder_id`` holds the model
    name and the weight file's SHA-256 prefix, so the same weights reached by tag or by path share one id.
    """

    def __init__(
        self,
        model_name: str = DEFAULT_CLIP_MODEL,
        weights: str | None = None,
        device: str | torch.device = "cpu",
        cache_dir: str | None = None,
    ) -> None:
        import open_clip

        self.model_name = model_name
        self.device = torch.device(device)
        self.weights_path, self.weights_origin = resolve_clip_weights(model_name, weights, cache_dir)
        self.encoder_id = f"openclip:{model_name}:sha256-{file_sha256(self.weights_path)[:16]}"
        self.dim = int(open_clip.get_model_config(model_name)["embed_dim"])
        self._model: torch.nn.Module | None = None
        self._tokenizer = None

    def load(self) -> None:
        """Load the weights now rather than on the first ``encode``."""
        if self._model is not None:
            return
        import open_clip

        with hub_offline():
            try:
                model = open_clip.create_model(
                    self.model_name, pretrained=str(self.weights_path), device=self.device, weights_only=True
                )
            except (RuntimeError, KeyError, ValueError, OSError) as e:
                raise ValueError(
                    f"{self.weights_path} could not be loaded as open_clip {self.model_name} weights: {e}. "
                    f"Check that the file belongs to {self.model_name} (open_clip_pytorch_model.bin or "
                    "open_clip_model.safetensors of one of its pretrained tags, or a saved state_dict)."
                ) from e
            try:
                tokenizer = open_clip.get_tokenizer(self.model_name)
            except OSError as e:
                raise MissingWeightsError(
                    f"the tokenizer of open_clip {self.model_name} is not available offline: {e}. "
                    + _how_to_supply(self.model_name, None)
                ) from e
        # Only the text tower is used; dropping the image tower halves the memory held.
        del model.visual
        self._model = model.eval()
        self._tokenizer = tokenizer

    def _encode(self, texts: list[str]) -> torch.Tensor:
        self.load()
        tokens = self._tokenizer(texts).to(self.device)
        return self._model.encode_text(tokens)
