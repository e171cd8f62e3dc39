"""``python -m atlasflow.cli``: what a SLURM job and the local backend run."""

import sys

from atlasflow.cli.main import main

sys.exit(main())
