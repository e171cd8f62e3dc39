"""Operating the pipeline: run report, system checks, notifications, storage views."""
