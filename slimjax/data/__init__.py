"""Data: corpora, tokenizers, packing and global batches."""
