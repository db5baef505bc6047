"""Diagonal Fisher information of a network over a calibration set.

F[θ] = E_x E_{y ~ p_θ(·|x)} [(∂ log p_θ(y|x) / ∂θ)²]: the "true" Fisher, taken under the model's own
predictive distribution (COIN's KL-barycenter derivation needs exactly this: it is the Hessian of
KL(p_θi ‖ p_θ) at θ = θ_i). `kind="true"` takes the expectation over y exactly (all C classes,
weighted by p); `"sampled"` draws one y ~ p per input (unbiased, C times cheaper); `"empirical"` uses
the dataset label instead (a different quantity, offered for comparison).

Per-sample squared gradients are vectorised with layer hooks rather than torch.func: for a Linear
layer Σ_n g_n² ⊗ a_n² is one matmul, for a Conv2d one batched matmul over unfolded inputs. Measured
on the default CNN, 1000 images, exact expectation: 1.45 s with hooks against 20 s with
vmap(jacrev) (docs/coin.md). tests/models/test_fisher.py checks both give the same numbers.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

FisherKind = Literal["true", "sampled", "empirical"]
FISHER_KINDS: tuple[FisherKind, ...] = ("true", "sampled", "empirical")


def _parametrised_layers(model: nn.Module) -> list[tuple[str, nn.Linear | nn.Conv2d]]:
    layers: list[tuple[str, nn.Linear | nn.Conv2d]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            layers.append((name, module))
        elif not list(module.children()) and any(True for _ in module.parameters(recurse=False)):
            raise TypeError(f"diagonal_fisher supports Linear and Conv2d parameters only, not {type(module).__name__}")
    return layers


def _targets(
    probs: torch.Tensor, kind: FisherKind, labels: torch.Tensor | None, generator: torch.Generator
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(class index (B, 1), weight (B,)) pairs whose weighted sum gives the expectation over y."""
    ones = torch.ones(len(probs))
    if kind == "true":
        return [(torch.full((len(probs), 1), c), probs[:, c]) for c in range(probs.shape[1])]
    if kind == "sampled":
        return [(torch.multinomial(probs, 1, generator=generator), ones)]
    if labels is None:
        raise ValueError("the empirical Fisher needs labels")
    return [(labels[:, None], ones)]


def _accumulate(
    layer: nn.Linear | nn.Conv2d, inputs: torch.Tensor, grad: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_n w_n (per-sample gradient)² for the layer's weight and bias, given the hook's stored inputs."""
    if isinstance(layer, nn.Linear):
        g2 = grad**2 * w[:, None]  # (B, out); inputs are already squared: (B, in)
        return g2.T @ inputs, g2.sum(0)
    g = grad.flatten(2)  # (B, out, P)
    per_sample = torch.bmm(g, inputs)  # inputs: unfolded (B, P, in*kh*kw) → (B, out, in*kh*kw)
    weight = torch.einsum("n,noi->oi", w, per_sample**2).view_as(layer.weight)
    return weight, (w[:, None] * g.sum(2) ** 2).sum(0)


def diagonal_fisher(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    kind: FisherKind = "true",
    batch_size: int = 250,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Mean over `images` (N, ...) of the squared per-sample gradients; keys as in `model.state_dict()`."""
    if kind not in FISHER_KINDS:
        raise ValueError(f"unknown Fisher kind {kind!r}; expected one of {FISHER_KINDS}")
    layers = _parametrised_layers(model)
    fisher = {f"{n}.{p}": torch.zeros_like(getattr(layer, p)) for n, layer in layers for p in ("weight", "bias")}
    requires = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)  # we need activation gradients only, never weight gradients
    generator = torch.Generator().manual_seed(seed)
    try:
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size]
            y = labels[start : start + batch_size] if labels is not None else None
            _accumulate_batch(model, layers, x, y, kind, generator, fisher)
    finally:
        for p, flag in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(flag)
    return {k: v / len(images) for k, v in fisher.items()}


def _accumulate_batch(
    model: nn.Module,
    layers: list[tuple[str, nn.Linear | nn.Conv2d]],
    x: torch.Tensor,
    y: torch.Tensor | None,
    kind: FisherKind,
    generator: torch.Generator,
    fisher: dict[str, torch.Tensor],
) -> None:
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def capture(name: str, layer: nn.Linear | nn.Conv2d):  # type: ignore[no-untyped-def]
        def hook(_module, args, out):  # type: ignore[no-untyped-def]
            a = args[0].detach()
            if isinstance(layer, nn.Conv2d):  # unfold once per batch, reused for every class
                a = nn.functional.unfold(a, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # type: ignore[arg-type]
                a = a.transpose(1, 2)  # (B, P, in*kh*kw)
            else:
                a = a**2  # (B, in): a Linear per-sample gradient is g ⊗ a, so its square is g² ⊗ a²
            inputs[name] = a
            outputs[name] = out.requires_grad_(True) if not out.requires_grad else out
            return outputs[name]

        return hook

    handles = [layer.register_forward_hook(capture(name, layer)) for name, layer in layers]
    try:
        logits = model(x)  # (B, C)
    finally:
        for handle in handles:
            handle.remove()
    log_probs = torch.log_softmax(logits, dim=1)
    targets = _targets(log_probs.detach().exp(), kind, y, generator)
    wrt = [outputs[name] for name, _ in layers]
    for step, (cls, weight) in enumerate(targets):
        grads = torch.autograd.grad(log_probs.gather(1, cls).sum(), wrt, retain_graph=step < len(targets) - 1)
        for (name, layer), grad in zip(layers, grads, strict=True):
            dw, db = _accumulate(layer, inputs[name], grad, weight)
            fisher[f"{name}.weight"] += dw
            fisher[f"{name}.bias"] += db
