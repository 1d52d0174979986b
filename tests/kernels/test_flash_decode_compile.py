"""The decode kernels compile for an H100 (sm_90) without a GPU, and with programmatic dependent launch on
they carry the grid-dependency instructions: the split kernel lets the merge kernel start, and the merge kernel
waits for the split kernel's writes before reading them. Skipped where Triton's NVIDIA tool chain is missing."""
import pytest

from .compile_gate import nvidia_tools, report_in_fresh_process

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

pytestmark = pytest.mark.skipif(nvidia_tools() is None,
                                reason="triton's NVIDIA tool chain (ptxas, cuobjdump) is not installed")

POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Mask": "*bf16", "Out": "*bf16",
            "PartOut": "*fp32", "PartStats": "*fp32", "Lse": "*fp32"}


def _ptx(kernel, constexprs, options):
    sig = {n: "constexpr" if n in constexprs else POINTERS.get(n, "fp32" if n == "qk_scale" else "i32")
           for n in kernel.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if n in POINTERS}
    src = ASTSource(kernel, sig, constexprs={(kernel.arg_names.index(n),): v for n, v in constexprs.items()},
                    attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def _report() -> dict:
    """Run in a fresh process without TRITON_INTERPRET (under it @triton.jit builds interpreter objects)."""
    from longattn.kernels.flash import triton_decode as dec
    out = {}
    for pdl in (False, True):
        split = _ptx(dec._decode_split_kernel,
                     dict(HEAD_DIM=64, HEAD_DIM_PAD=64, DV=64, DV_PAD=64, ROWS=16, CAUSAL=False, HAS_MASK=False,
                          MASK_IS_BOOL=False, DOT_PRECISION="ieee", INTERLEAVED=True, PDL=pdl,
                          BLOCK_N=64),
                     {"num_warps": 4, "num_stages": 2})
        merge = _ptx(dec._decode_merge_kernel, dict(DV=64, DV_PAD=64, SPLITS_PAD=16, PDL=pdl),
                     {"num_warps": 4, "launch_pdl": pdl})
        out[str(pdl)] = {"split_launches": "griddepcontrol.launch_dependents" in split,
                         "split_waits": "griddepcontrol.wait" in split,
                         "merge_waits": "griddepcontrol.wait" in merge}
    return out


@pytest.fixture(scope="module")
def report():
    return report_in_fresh_process("tests.kernels.test_flash_decode_compile", "_report")


@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "pdl"])
def test_decode_kernels_carry_grid_dependency_control_only_when_asked(report, pdl):
    r = report[str(pdl)]
    assert r["split_launches"] == pdl
    assert r["merge_waits"] == pdl
    assert not r["split_waits"]  # the split kernel reads no earlier kernel's output: it never waits
