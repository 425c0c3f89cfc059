import pytest

from tests.threads import _one_thread  # noqa: F401  (autouse fixture)

from .tiny import make_dense


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A 2-layer LLaMA (hidden 32, FFN 64, vocab 260, tied embeddings) with a byte tokenizer."""
    path = tmp_path_factory.mktemp("tiny") / "llama"
    make_dense(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_untied(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama-untied"
    make_dense(path, tied=False, seed=1)
    return path


