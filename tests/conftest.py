import os

# Triton kernels run in the interpreter on machines without a GPU; this must be set
# before anything imports triton.
if not os.environ.get("LONGATTN_TEST_CUDA"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _fix_interpreter_loop_bounds():
    """Triton < 3.7's interpreter turns a runtime loop bound into an int with int(ndarray), which
    numpy 2 refuses for the 1-element arrays it holds (3.7+ squeezes first): do what 3.7 does."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_loop_bounds()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
