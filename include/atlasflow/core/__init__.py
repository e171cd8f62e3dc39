"""Configuration, on-disk layout and records, filesystem helpers: the layer everything stands on."""
