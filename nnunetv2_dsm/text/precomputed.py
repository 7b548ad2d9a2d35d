"""Precomputed prompt embeddings in a file (.pt or .npz), for machines without the original encoder."""

import os
from pathlib import Path

import numpy as np
import torch

from nnunetv2_dsm.errors import DSMError
from nnunetv2_dsm.io.atomic import atomic_path
from nnunetv2_dsm.text.base import TextEncoder, l2_normalise, validate_texts
from nnunetv2_dsm.text.spec import spec_hint

_SUFFIXES = (".pt", ".npz")


class MissingPromptError(DSMError, LookupError):
    """A prompt that the embeddings file does not contain."""


def _check_suffix(path: Path) -> None:
    if path.suffix not in _SUFFIXES:
        raise ValueError(f"{path}: embeddings files end in .pt or .npz, got {path.suffix!r}")


def save_embeddings(
    path: str | os.PathLike, texts: list[str], vectors: torch.Tensor, encoder_id: str
) -> Path:
    """Write ``texts`` -> ``vectors`` (n, dim) with the ``encoder_id`` that made them; atomic (temp file, rename).

    .pt holds {"names": list[str], "vectors": float32 tensor, "encoder_id": str}; .npz holds the same keys as
    arrays. Returns the path written.
    """
    path = Path(path)
    _check_suffix(path)
    validate_texts(texts)
    if len(set(texts)) != len(texts):
        duplicates = sorted({t for t in texts if texts.count(t) > 1})
        raise ValueError(f"{path}: duplicate prompts {duplicates}; each prompt is stored once")
    if not encoder_id.strip():
        raise ValueError(
            f"{path}: encoder_id is empty; pass the encoder_id of the encoder that made the vectors"
        )
    vectors = torch.as_tensor(vectors).detach().to("cpu", torch.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(texts):
        raise ValueError(f"{path}: vectors have shape {tuple(vectors.shape)}, expected ({len(texts)}, dim)")
    vectors = l2_normalise(vectors, source=str(path))

    with atomic_path(path) as tmp:
        # Writing through the open file object keeps np.savez from appending its own ".npz".
        with open(tmp, "wb") as f:
            if path.suffix == ".pt":
                torch.save({"names": list(texts), "vectors": vectors, "encoder_id": encoder_id}, f)
            else:
                np.savez(
                    f,
                    names=np.array(texts, dtype=str),
                    vectors=vectors.numpy(),
                    encoder_id=np.array(encoder_id),
                )
    return path


def load_embeddings(path: str | os.PathLike) -> tuple[list[str], torch.Tensor, str]:
    """Read a file written by ``save_embeddings``: (names, unit-norm float32 vectors (n, dim), encoder_id)."""
    path = Path(path)
    _check_suffix(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"embeddings file {path} does not exist; create it with `nnunetv2_dsm embed -o {path} ...`"
        )
    try:
        if path.suffix == ".pt":
            data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with np.load(path, allow_pickle=False) as npz:
                data = {key: npz[key] for key in npz.files}
    except Exception as e:
        raise ValueError(f"{path} is not a readable embeddings file ({type(e).__name__}: {e})") from e
    missing = (
        [key for key in ("names", "vectors", "encoder_id") if key not in data]
        if isinstance(data, dict)
        else []
    )
    if not isinstance(data, dict) or missing:
        raise ValueError(
            f"{path} lacks {missing or 'a dict with names, vectors, encoder_id'}; "
            "write it with nnunetv2_dsm.text.save_embeddings or `nnunetv2_dsm embed`"
        )
    names = [str(n) for n in list(data["names"])]
    vectors = torch.as_tensor(np.asarray(data["vectors"]) if path.suffix == ".npz" else data["vectors"])
    encoder_id = str(
        data["encoder_id"].item() if isinstance(data["encoder_id"], np.ndarray) else data["encoder_id"]
    )
    if vectors.ndim != 2 or vectors.shape[0] != len(names):
        raise ValueError(f"{path}: {len(names)} names but vectors of shape {tuple(vectors.shape)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate names; each prompt must appear once")
    return names, l2_normalise(vectors.to(torch.float32), source=str(path)), encoder_id


class PrecomputedEncoder(TextEncoder):
    """Looks prompts up in an embeddings file; carries the id of the encoder that made the file.

    A model trained with encoder X can therefore predict with a file made by X on another machine.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        names, vectors, self.encoder_id = load_embeddings(self.path)
        self.dim = int(vectors.shape[1])
        self.names = names
        self._index = {name: i for i, name in enumerate(names)}
        self._vectors = vectors

    def _encode(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in texts if t not in self._index]
        if missing:

            raise MissingPromptError(
                f"embeddings file {self.path} has no vector for prompt(s) {missing}; it holds {len(self.names)} "
                f"prompts made by {self.encoder_id!r}. Regenerate it including these prompts with "
                f"`nnunetv2_dsm embed -o {self.path} --text-encoder {spec_hint(self.encoder_id)} --prompts ...`"
            )
        return self._vectors[[self._index[t] for t in texts]]
