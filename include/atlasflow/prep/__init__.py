"""Preparing cells for the model: QC, gene mapping onto the vocabulary, processed files."""
