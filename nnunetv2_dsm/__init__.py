"""nnU-Net v2 extension implementing DSM: diffusion-guided features, state-space models and
text-aligned object queries for organ and unseen-tumour segmentation in CT."""

__version__ = "0.1.0"
