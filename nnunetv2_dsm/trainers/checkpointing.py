"""Checkpoints that are never half-written and that say clearly when they cannot be read.

A mixin for every trainer of this package (DSM, SDSeg, DiffuGTS): nnU-Net's ``save_checkpoint`` writes into a
temporary file that is renamed when complete, and ``load_checkpoint`` turns an unreadable file into a
``DSMCheckpointError`` naming it and the way to continue.
"""

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_dsm.errors import DSMError
from nnunetv2_dsm.io.atomic import atomic_path
from nnunetv2_dsm.io.checkpoint import readable_checkpoint


class DSMCheckpointError(DSMError, RuntimeError):
    """A checkpoint file that cannot be read (truncated, or not a torch checkpoint)."""


class AtomicCheckpoint(nnUNetTrainer):
    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """nnU-Net's loading; a file that torch cannot read is a ``DSMCheckpointError`` naming it."""
        try:
            super().load_checkpoint(filename_or_checkpoint)
        except Exception as err:  # noqa: BLE001 - torch raises several types for a damaged file
            if not isinstance(filename_or_checkpoint, str) or readable_checkpoint(filename_or_checkpoint):
                raise
            raise DSMCheckpointError(
                f"{filename_or_checkpoint}: not a readable checkpoint ({type(err).__name__}: {err}); it is "
                "truncated or not a torch checkpoint. Delete it to continue from checkpoint_latest.pth / "
                "checkpoint_best.pth (nnUNetv2_train --c picks the next one), or train without --c"
            ) from err

    def save_checkpoint(self, filename: str) -> None:
        """Write to a temporary file and rename, so an interrupted save never leaves a truncated checkpoint."""
        if self.local_rank != 0 or self.disable_checkpointing:
            super().save_checkpoint(filename)  # nnU-Net writes nothing then, and says so
            return
        # a killed earlier save of this checkpoint leaves its temporary behind; atomic_path removes it
        with atomic_path(filename) as tmp:
            super().save_checkpoint(str(tmp))
