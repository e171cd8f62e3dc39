"""Reading count matrices in every supported format."""
