"""Test setup: 8 fake CPU devices (set before JAX is imported), a compilation cache, shared fixtures."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same programs (same config, same mesh); a persistent cache shared with
# the CLI subprocesses the tests start turns repeats into cache hits.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "slimjax-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest  # noqa: E402

from slimjax.data import shakespeare, tokenizer  # noqa: E402

EVAL_PLAYS = ("hamlet", "the-tempest", "twelfth-night")


@pytest.fixture(scope="session")
def spm_path(tmp_path_factory) -> str:
    """One SentencePiece model (BPE, 1024 pieces) trained on the training plays, shared by all tests."""
    train_docs, _ = shakespeare.load(EVAL_PLAYS)
    path = tmp_path_factory.mktemp("tok") / "spm.model"
    tokenizer.train_sentencepiece(train_docs, 1024, "bpe", path)
    return str(path)
