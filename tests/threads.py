"""One torch thread for the duration of a test (import ``_one_thread`` into a conftest or test module).

Tiny models run fastest on one thread, and the shared 2-core test machine punishes oversubscription.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
