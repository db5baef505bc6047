from __future__ import annotations

import pytest
import torch

from models.bitplanes import RefinementPlan, decompose, plane, row_exponent, top_exponent, truncate
from models.errors import RefinementError


def test_top_exponent_bounds_every_value_from_above():
    v = torch.tensor([0.3, -0.74, 0.5, 0.0])
    p0 = top_exponent(v)
    assert p0.item() == 0.0  # 2^0 = 1 > 0.74 >= 2^-1
    assert torch.all(v.abs() < 2.0**p0)


def test_per_channel_exponents_follow_each_output_channel():
    w = torch.tensor([[0.9, -0.1], [0.02, 0.03], [0.0, 0.0]])
    assert top_exponent(w, per_channel=True).flatten().tolist() == [0.0, -5.0, 0.0]


def test_truncation_is_toward_zero_on_the_plane_grid():
    v = torch.tensor([0.8125, -0.8125, 0.3, -0.3])
    out = truncate(v, 2, torch.tensor(0.0))  # planes 2^-1 and 2^-2
    assert out.tolist() == [0.75, -0.75, 0.25, -0.25]


def test_planes_sum_to_the_truncation_exactly():
    torch.manual_seed(0)
    v = torch.randn(1000) * 3
    p0 = top_exponent(v)
    for planes in (1, 4, 9):
        assert torch.equal(sum(decompose(v, planes, p0)), truncate(v, planes, p0))


def test_each_plane_is_one_bit_per_element():
    torch.manual_seed(1)
    v = torch.randn(500)
    p0 = top_exponent(v)
    for r in range(1, 6):
        bits = plane(v, r, p0).abs() / 2.0 ** (p0 - r)
        assert set(bits.unique().tolist()) <= {0.0, 1.0}


def test_eight_planes_hold_a_pixel_exactly():
    pixels = torch.arange(256, dtype=torch.float32) / 256
    assert torch.equal(truncate(pixels, 8, torch.tensor(0.0)), pixels)


def test_row_exponent_does_not_depend_on_batch_mates():
    x = torch.rand(4, 1, 28, 28) * 0.4
    alone = row_exponent(x[:1])
    with_bright_neighbour = row_exponent(torch.cat([x[:1], torch.full((1, 1, 28, 28), 0.99)]))
    assert torch.equal(alone[0], with_bright_neighbour[0])


def test_plan_always_ends_with_float32():
    plan = RefinementPlan((3, 5))
    assert plan.resolutions == 3
    assert [plan.planes_at(i) for i in range(3)] == [3, 5, None]
    assert RefinementPlan.parse("3,5,full") == plan
    assert RefinementPlan.from_dict(plan.to_dict()) == plan


@pytest.mark.parametrize("planes", [(4, 3), (0, 2), (2, 2)])
def test_plan_refuses_non_increasing_planes(planes):
    with pytest.raises(RefinementError, match="strictly increasing"):
        RefinementPlan(planes)


def test_plan_refuses_garbage_text():
    with pytest.raises(RefinementError, match="plane counts"):
        RefinementPlan.parse("four,full")
