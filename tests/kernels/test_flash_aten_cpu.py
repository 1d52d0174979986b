"""ATen's fused CPU kernel as the flash kind's CPU path (kernels/flash/aten_cpu.py), against the float64 reference,
and the shapes where it must not be used because its semantics differ from ours."""
import pytest
import torch

from longattn.kernels.flash import flash_attention_reference
from longattn.kernels.flash.aten_cpu import aten_cpu_applies, aten_cpu_attention

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _reference(q, k, v, scale, causal, mask):
    if mask is not None and mask.is_floating_point():
        mask = mask.double()
    out, lse = flash_attention_reference(q.double(), k.double(), v.double(), scale=scale, causal=causal,
                                         attn_mask=mask)
    return out, lse.double()


def _mask(kind, b, sq, sk):
    if kind is None:
        return None
    if kind == "bool":
        keep = torch.rand(b, 1, sq, sk) > 0.4
        keep[..., 1, :] = False  # a row that sees no key: out 0, lse -inf
        return keep
    add = torch.randn(1, 1, sq, sk)
    add[..., 2, :] = float("-inf")
    add[..., 3, :] = torch.finfo(torch.float32).min  # HF's fill: the uniform mean, not a dead row
    return add


CASES = [  # (batch, q heads, kv heads, q len, k len, head dim, causal, mask)
    (2, 4, 4, 37, 37, 16, True, None), (1, 9, 3, 50, 50, 64, True, None), (2, 4, 2, 1, 70, 32, True, None),
    (1, 6, 2, 19, 45, 24, False, None), (2, 4, 2, 33, 33, 16, False, "bool"), (1, 2, 1, 21, 29, 80, False, "float"),
    (1, 4, 2, 40, 40, 16, True, "float"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "h{}kv{}q{}k{}d{}-{}-{}".format(*c[1:6], "causal" if c[6] else
                                                                                          "full", c[7]))
def test_aten_cpu_path_gives_the_reference_out_and_lse(case, dtype):
    b, hq, hkv, sq, sk, d, causal, mask_kind = case
    q, k, v = torch.randn(b, hq, sq, d, dtype=dtype), torch.randn(b, hkv, sk, d, dtype=dtype), \
        torch.randn(b, hkv, sk, d, dtype=dtype)
    mask = _mask(mask_kind, b, sq, sk)
    if mask_kind == "float" and dtype != torch.float32:
        pytest.skip("half-precision inputs with a float mask take the reference")
    assert aten_cpu_applies(q, k, v, causal, mask)
    out, lse = aten_cpu_attention(q, k, v, 0.3, causal, mask)
    ref_out, ref_lse = _reference(q, k, v, 0.3, causal, mask)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == ref_out.shape
    assert ((out.double() - ref_out).norm() / ref_out.norm()).item() < TOLERANCE[dtype]
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    seen = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[seen], ref_lse[seen], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("mask_shape", [(6,), (1, 6), (4, 1, 6), (3, 6)], ids=str)
def test_aten_cpu_path_broadcasts_masks_of_every_rank(mask_shape):
    """Found by the corpus: a 3-D site's mask, given a leading 1 by the rewriter, reached ATen's kernel as 3-D,
    which it refuses (it takes 2-D or 4-D)."""
    q, k, v = (torch.randn(1, 4, n, 8) for n in (3, 6, 6))
    mask = torch.rand(mask_shape) > 0.5
    mask[..., 0] = True
    assert aten_cpu_applies(q, k, v, False, mask)
    out, lse = aten_cpu_attention(q, k, v, 0.3, False, mask)
    ref_out, ref_lse = _reference(q, k, v, 0.3, False, mask)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-4)


def test_aten_cpu_path_is_not_taken_where_its_semantics_differ():
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    assert not aten_cpu_applies(q, k, v, causal=True)  # 5 queries, 9 keys: ATen aligns causal top-left
    assert aten_cpu_applies(q, k, v, causal=False)
    assert not aten_cpu_applies(q, k, v, causal=False, dropout_p=0.1)  # our dropout replays from a seed
    assert not aten_cpu_applies(q, k, torch.randn(1, 2, 9, 24), causal=False)  # one head size for q, k, v only
    half = q.bfloat16()
    assert not aten_cpu_applies(half, k.bfloat16(), v.bfloat16(), False, torch.zeros(5, 9))  # mask loses digits
    assert aten_cpu_applies(half, k.bfloat16(), v.bfloat16(), False, torch.ones(5, 9, dtype=torch.bool))
    assert not aten_cpu_applies(q.requires_grad_(), k, v, causal=False)  # its lse carries no gradient
    with torch.no_grad():
        assert aten_cpu_applies(q, k, v, causal=False)


def test_reference_is_forced_by_the_environment(monkeypatch):
    q = torch.randn(1, 2, 5, 16)
    monkeypatch.setenv("LONGATTN_FLASH_CPU", "reference")
    assert not aten_cpu_applies(q, q, q, causal=True)
