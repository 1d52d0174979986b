"""Evaluating a static subgraph at small lengths (fx_eval.generic_sizes): the traced length is replaced wherever it
is written, the small lengths lie above every other integer constant, and a subgraph whose shapes do not follow
the replacement is refused rather than evaluated as something else."""
import pytest
import torch

from longattn.patterns.fx_eval import NotGeneric, SmallSizes, evaluate, generic_sizes
from tests.zoo import dynamo_graph


def _static_graph(fn, *example):
    return dynamo_graph(fn, *example, dynamic=False)


def _placeholder_and_output(gm):
    nodes = list(gm.graph.nodes)
    return next(n for n in nodes if n.op == "placeholder"), next(n for n in nodes if n.op == "output").args[0][0]


def test_a_static_length_is_replaced_wherever_it_is_written_and_shapes_follow():
    gm = _static_graph(lambda x: x.view(1, 4096, 2).transpose(1, 2).reshape(2, 4096) * 3, torch.randn(8192))
    x, out = _placeholder_and_output(gm)
    sizes = generic_sizes([4096], gm.graph.nodes)
    small = sizes(4096)
    assert small < 100 and sizes(8192) == 8192  # 8192 is the input's size, not a length named to it
    with pytest.raises(RuntimeError):  # an input left at its traced 8192 = 2·4096 no longer fits the view
        evaluate([out], {x: torch.randn(8192)}, sizes)
    (value,) = evaluate([out], {x: torch.randn(2 * small)}, sizes)
    assert value.shape == (2, small)


def test_a_slice_to_part_of_the_length_is_refused_at_small_lengths():
    """x[:, :4096] of a traced 8192: at 23 it would keep everything and hide the cut. The constant 4096 lifts the
    small length above it, and where it is given a smaller one anyway, the shapes no longer follow: refused."""
    gm = _static_graph(lambda x: x[:, :4096] * 2, torch.randn(3, 8192))
    x, out = _placeholder_and_output(gm)
    sizes = generic_sizes([8192], gm.graph.nodes)
    assert sizes(8192) > 4096
    (value,) = evaluate([out], {x: torch.randn(3, sizes(8192))}, sizes)
    assert value.shape == (3, 4096)
    too_small = SmallSizes({8192: 23})
    with pytest.raises(NotGeneric, match="at the small lengths"):
        evaluate([out], {x: torch.randn(3, 23)}, too_small)


def test_constants_push_the_small_lengths_above_them():
    gm = _static_graph(lambda n: torch.arange(8192)[None, :] - torch.arange(8192)[:, None] < 300, torch.empty(0))
    sizes = generic_sizes([8192], gm.graph.nodes)
    assert 300 < sizes(8192) < 8192


def test_a_length_equal_to_another_dim_cannot_be_replaced():
    assert generic_sizes([128], [], other_sizes=(1, 4, 128)) is None
    assert generic_sizes([32], [], other_sizes=(1, 4, 32)).lengths == {}  # short lengths are not replaced
