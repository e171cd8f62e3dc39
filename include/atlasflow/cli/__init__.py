"""The ``atlasflow`` command line: one module per command group, stitched by :mod:`atlasflow.cli.main`."""

from atlasflow.cli.main import main

__all__ = ["main"]
