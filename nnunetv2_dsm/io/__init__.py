"""Lowest layer: image orientation and other file-level facts shared by every command."""
