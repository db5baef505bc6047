"""Integer coarse resolutions: the served int8 pass is bit-identical to the plain numpy integer reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from models import int8
from models.bitplanes import RefinementPlan
from models.errors import RefinementError
from models.networks import CNNConfig, MLPConfig, build_cnn, build_mlp
from models.refine import RefinementEngine

ENGINES = int8.available_engines()
MODELS = {
    "cnn": (lambda: build_cnn(CNNConfig(channels=(4, 8), hidden=16)), (-4, -3, -3)),
    "cnn-wide": (lambda: build_cnn(CNNConfig(channels=(16, 24), hidden=32)), (-5, -4, -2)),
    "mlp": (lambda: build_mlp(MLPConfig(hidden=(32, 16))), (-3, -2)),
}


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = MODELS[name][0]().eval()
    with torch.no_grad():  # larger weights than the default init, so activations reach the clamp at 255
        for p in model.parameters():
            p.mul_(4)
    return model


def _inputs(batch: int = 6, seed: int = 1) -> torch.Tensor:
    """Normalised-looking images; rows at different scales (other input exponents), one all zero."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(batch, 1, 28, 28, generator=g) - 0.3) * 3
    x[1] *= 0.1  # a smaller top exponent
    x[2] *= 9.0
    x[3] = 0.0
    return x


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("planes", [1, 3, 4, 6])
def test_int8_pass_is_bit_identical_to_the_numpy_integer_reference(engine, name, planes):
    model = _model(name)
    res = int8.IntResolution(model, planes, MODELS[name][1], engine)
    x = _inputs()
    got = res.forward(x).numpy()
    want = res.reference_logits(x.numpy())
    assert got.dtype == want.dtype == np.float32
    assert np.array_equal(got, want)


def test_reference_saturates_and_rounds_half_to_even():
    """Tiny case by hand: a 1-input linear layer, grid 2⁰: 2.5 → 2, 3.5 → 4, 300 → 255, −1 → 0."""
    hidden = nn.Linear(1, 4)
    out = nn.Linear(4, 1)
    with torch.no_grad():
        hidden.weight.copy_(torch.tensor([[2.5], [3.5], [300.0], [-1.0]]) / 4)  # one per output channel
        hidden.bias.zero_()
        out.weight.fill_(1.0)
        out.bias.zero_()
    model = nn.Sequential(nn.Flatten(), hidden, nn.ReLU(), out).eval()
    res = int8.IntResolution(model, 6, (0,), ENGINES[0])
    x = torch.tensor([[4.0]])  # top exponent 3: 4 = 32 · 2⁻³ at 6 planes
    (logit,) = res.reference_logits(x.numpy())[0]
    assert logit == 2 + 4 + 255 + 0
    assert res.forward(x).item() == logit


def test_a_row_never_depends_on_its_batch_mates():
    model = _model("cnn")
    res = int8.IntResolution(model, 4, MODELS["cnn"][1], ENGINES[0])
    x = _inputs(8)
    together = res.forward(x)
    for i in range(len(x)):
        assert torch.equal(res.forward(x[i : i + 1])[0], together[i])


@pytest.mark.parametrize(
    ("model", "planes", "reason"),
    [
        (nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Sigmoid()), 4, "Sigmoid"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(338, 3)), 4, "AvgPool"),
        (nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.Linear(8, 10)), 4, "ReLU"),
        (build_mlp(MLPConfig(hidden=(8,))), 7, "1..6 planes"),
    ],
)
def test_models_and_planes_without_an_integer_program_say_why(model, planes, reason):
    why = int8.unsupported(model, planes)
    assert why is not None and reason in why
    with pytest.raises(RefinementError, match=reason.split()[0]):
        int8.IntResolution(model, planes, (0,), ENGINES[0])


def test_grid_must_match_the_hidden_layers():
    with pytest.raises(RefinementError, match="grid has 1 exponents"):
        int8.IntResolution(_model("cnn"), 4, (-4,), ENGINES[0])


def test_integer_plan_serves_int8_coarse_resolutions_and_the_float32_model_last():
    model = _model("cnn")
    plan = RefinementPlan((3, 5), grid=MODELS["cnn"][1])
    engine = RefinementEngine(model, plan, sample=_inputs(16))
    assert engine.engine_choice["engine"] in ENGINES
    assert set(engine.engine_choice["measured_ms"]) == set(ENGINES)
    assert engine.kernels == [f"int8/{engine.engine_choice['engine']}"] * 2 + ["float32"]
    x = _inputs(5, seed=3)
    for r in range(plan.resolutions):
        assert torch.equal(engine.forward(x, r), engine.reference(x, r))
    with torch.no_grad():
        assert torch.equal(engine.forward(x, 2), model(x))
    streamed = [step.probs for step in engine.stream(x)]
    assert torch.equal(streamed[0], torch.softmax(engine.forward(x, 0), 1))


def test_a_plan_without_grid_or_a_model_without_program_stays_in_float32():
    x = _inputs(4)
    float_plan = RefinementEngine(_model("mlp"), RefinementPlan((4,)))
    assert float_plan.kernels == ["float32", "float32"] and float_plan.integer == {}
    sigmoid = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10), nn.ReLU())
    engine = RefinementEngine(sigmoid.eval(), RefinementPlan((4,), grid=(-3,)), sample=x)
    assert engine.kernels == ["float32", "float32"] and "last layer" in engine.engine_choice["reason"]
    assert torch.equal(engine.forward(x, 0), engine.float_forward(x, 0))


def test_integer_plan_round_trips_and_checks_its_grid():
    plan = RefinementPlan((4,), grid=(-4, -2, -3))
    assert plan.to_dict() == {"planes": [4], "per_channel": True, "final": "float32", "grid": [-4, -2, -3]}
    assert RefinementPlan.from_dict(plan.to_dict()) == plan
    assert RefinementPlan.from_dict({"planes": [4], "per_channel": True}).grid is None  # older bundles
    with pytest.raises(RefinementError, match="per-channel"):
        RefinementPlan((4,), per_channel=False, grid=(-4,))
    with pytest.raises(RefinementError, match="integer exponents"):
        RefinementPlan((4,), grid=(100,))
