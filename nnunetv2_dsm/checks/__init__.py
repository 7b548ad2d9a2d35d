"""Checks of user inputs (images, labels, datasets, output folders) with errors that say how to fix them."""
