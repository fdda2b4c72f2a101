"""Corpus preparation, SlimPajama style: NFC, short-document filter, MinHash-LSH near-duplicate
removal across all sources, held-out split with decontamination, SlimPajama-layout output."""

from slimjax.data.prepare.run import PrepareOptions, prepare

__all__ = ["PrepareOptions", "prepare"]
