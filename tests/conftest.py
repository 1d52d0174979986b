import os

# Triton kernels run in the interpreter on machines without a GPU; this must be set
# before anything imports triton.
if not os.environ.get("LONGATTN_TEST_CUDA"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
