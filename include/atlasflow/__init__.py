"""atlasflow: stream single-cell datasets into an incrementally trained foundation model.

The library never imports Airflow: it runs alone on a SLURM node and under pytest.
"""

from __future__ import annotations

__version__ = "0.1.0"
