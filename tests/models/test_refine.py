from __future__ import annotations

import pytest
import torch
from torch import nn

from models.bitplanes import RefinementPlan
from models.errors import RefinementError
from models.networks import CNNConfig, MLPConfig, build_cnn, build_mlp
from models.refine import RefinementEngine, activation_nbytes

ARCHITECTURES = {
    "cnn": lambda: build_cnn(CNNConfig(channels=(4, 8), hidden=16)),
    "cnn-wide": lambda: build_cnn(CNNConfig(channels=(8, 6), hidden=5)),
    "mlp": lambda: build_mlp(MLPConfig(hidden=(32, 16))),
}
PLAN = RefinementPlan((2, 3, 5, 8))


@pytest.fixture(params=sorted(ARCHITECTURES))
def engine(request):
    torch.manual_seed(0)
    return RefinementEngine(ARCHITECTURES[request.param]().eval(), PLAN)


def _inputs(seed: int = 1, batch: int = 7) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.floor(torch.rand(batch, 1, 28, 28) * 256) / 256


def test_fast_pass_equals_the_truncated_reference_at_every_resolution(engine):
    x = _inputs()
    for r in range(PLAN.resolutions):
        assert torch.equal(engine.forward(x, r), engine.reference(x, r))


def test_incremental_upgrades_equal_the_truncated_reference(engine):
    x = _inputs(2)
    state, logits = engine.begin(x)
    torch.testing.assert_close(logits, engine.reference(x, 0), rtol=0, atol=1e-5)
    for r in range(1, PLAN.resolutions):
        logits = engine.upgrade(state)
        torch.testing.assert_close(logits, engine.reference(x, r), rtol=1e-5, atol=1e-5)


def test_last_resolution_is_the_float32_model(engine):
    x = _inputs(3)
    model_out = nn.Sequential(*(op.module for op in engine.ops))(x)
    assert torch.equal(engine.forward(x, PLAN.resolutions - 1), model_out.detach())


def test_truncated_reference_truncates_weights_and_input():
    torch.manual_seed(4)
    model = build_mlp(MLPConfig(hidden=(8,))).eval()
    engine = RefinementEngine(model, RefinementPlan((3,), per_channel=False))
    x = _inputs(4, 2)
    from models.bitplanes import row_exponent, top_exponent, truncate

    manual = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU(), nn.Linear(8, 10))
    with torch.no_grad():
        for src, dst in zip([model[1], model[3]], [manual[1], manual[3]], strict=True):
            dst.weight.copy_(truncate(src.weight, 3, top_exponent(src.weight)))
            dst.bias.copy_(truncate(src.bias, 3, top_exponent(src.bias)))
        expected = manual(truncate(x, 3, row_exponent(x)))
    assert torch.equal(engine.reference(x, 0), expected)


def test_state_stays_within_two_forward_passes_of_activations(engine):
    x = _inputs(5, 1)
    state, _ = engine.begin(x)
    assert state.nbytes() <= 2 * activation_nbytes(engine, x)  # the issue allows 4×; CNN measures 1.02×


def test_released_state_refuses_to_upgrade(engine):
    state, _ = engine.begin(_inputs(6, 2))
    state.release()
    assert state.acts == []
    with pytest.raises(RefinementError, match="released"):
        engine.upgrade(state)


def test_upgrading_past_float32_is_refused(engine):
    state, _ = engine.begin(_inputs(6, 1))
    for _ in range(PLAN.resolutions - 1):
        engine.upgrade(state)
    with pytest.raises(RefinementError, match="already at the final"):
        engine.upgrade(state)


def test_closing_a_stream_stops_the_computation(engine, monkeypatch):
    calls = []
    original = engine.forward
    monkeypatch.setattr(engine, "forward", lambda x, r: calls.append(r) or original(x, r))
    stream = engine.stream(_inputs(7))
    assert next(stream).index == 0
    stream.close()  # the request was cancelled
    assert calls == [0]


def test_stream_yields_every_resolution_in_order(engine):
    steps = list(engine.stream(_inputs(8), start=1))
    assert [s.index for s in steps] == [1, 2, 3, 4]
    assert [s.planes for s in steps] == [3, 5, 8, None]
    assert all(bool(s.computed.all()) for s in steps)


def test_adaptive_stop_skips_confident_rows_on_later_resolutions():
    torch.manual_seed(9)
    engine = RefinementEngine(build_mlp(MLPConfig(hidden=(16,))).eval(), PLAN)
    x = _inputs(9, 16)
    margins = torch.full((16,), float("inf"))
    margins[:8] = -1.0  # every margin exceeds -1: these rows stop after the first resolution
    steps = list(engine.stream(x, stop_margin=margins))
    assert steps[0].computed.all()
    assert not steps[1].computed[:8].any() and steps[1].computed[8:].all()
    final = steps[-1].probs
    torch.testing.assert_close(final[:8], torch.softmax(engine.forward(x[:8], 0), 1))
    torch.testing.assert_close(final[8:], torch.softmax(engine.forward(x[8:], PLAN.resolutions - 1), 1))


def test_unsupported_layers_are_refused():
    with pytest.raises(RefinementError, match="supports"):
        RefinementEngine(nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Sigmoid()), PLAN)


def test_first_within_picks_the_first_resolution_close_enough_to_full():
    from models.refine_eval import first_within

    rows = [
        {"batch": 1, "resolution": 0, "planes": 3, "accuracy": 0.10, "cumulative_ms": 1, "best_float32_ms": 2},
        {"batch": 64, "resolution": 0, "planes": 3, "accuracy": 0.80, "cumulative_ms": 1.0, "best_float32_ms": 2.0},
        {"batch": 64, "resolution": 1, "planes": 4, "accuracy": 0.86, "cumulative_ms": 2.5, "best_float32_ms": 2.0},
        {"batch": 64, "resolution": 2, "planes": None, "accuracy": 0.90, "cumulative_ms": 4.5, "best_float32_ms": 2.0},
    ]
    for row in rows:
        row["vs_best_float32"] = row["cumulative_ms"] / row["best_float32_ms"]
    first = first_within(rows, 64, 0.05)
    assert first is not None and first["resolution"] == 1 and first["vs_best_float32"] == 1.25
    assert first_within(rows, 64, 0.0)["resolution"] == 2  # only the full model itself
