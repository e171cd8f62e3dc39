"""The single-cell foundation model: tokenizer, transformer, streaming data, incremental training."""
