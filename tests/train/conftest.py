import pytest

from tests.threads import _one_thread  # noqa: F401  (autouse fixture)

from .tiny import save_tiny, tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A saved tiny MoE model (4 experts, top-2) with its tokenizer."""
    return save_tiny(tmp_path_factory.mktemp("tiny-moe"), tokenizer)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One token cache for the session's tiny runs."""
    return str(tmp_path_factory.mktemp("token-cache"))


@pytest.fixture
def make_cfg(tmp_path, tiny_dir, cache_dir):
    """A tiny two-domain training config; keyword arguments override keys."""

    def make(**kw):
        base = {
            "model": str(tiny_dir),
            "output_dir": str(tmp_path / "out"),
            "data": [
                {"name": "prose", "builtin": "prose", "weight": 0.5, "max_tokens": 3000},
                {"name": "arith", "builtin": "arithmetic", "weight": 0.5, "max_tokens": 3000},
            ],
            "steps": 6,
            "batch_size": 4,
            "micro_batch_size": 2,
            "seq_len": 32,
            "lr": 3e-3,
            "warmup_steps": 1,
            "save_every": 2,
            "log_every": 1,
            "eval_tokens": 256,
            "progress": False,
            "plots": False,
            "cache_dir": cache_dir,
            "device": "cpu",  # the CPU reference behaviour; tests/train/test_cuda.py covers the GPU
        }
        base.update(kw)
        return base

    return make
