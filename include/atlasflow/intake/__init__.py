"""The manifest and the plan of stable batches."""
