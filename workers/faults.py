"""Fault injection for tests and benchmarks: delays, pause windows, errors and garbage replies.

Off unless configured (FaultSettings.enabled). Everything is drawn from one seeded generator, so a
benchmark can replay the same faults against every serving mode.
"""

from __future__ import annotations

import asyncio
import random
import time
from enum import Enum

from workers.settings import FaultSettings


class Verdict(Enum):
    SERVE = "serve"
    ERROR = "error"
    GARBAGE = "garbage"


def parse_delay(spec: str) -> tuple[str, list[float]]:
    """'const:50', 'exp:20' or 'pareto:5:1.5' → (kind, numbers), validated."""
    kind, _, rest = spec.partition(":")
    try:
        numbers = [float(v) for v in rest.split(":")] if rest else []
    except ValueError as exc:
        raise ValueError(f"fault delay {spec!r}: numbers expected after the kind") from exc
    expected = {"const": 1, "exp": 1, "pareto": 2}
    if kind not in expected or len(numbers) != expected[kind] or any(n <= 0 for n in numbers):
        raise ValueError(
            f"fault delay {spec!r} must be const:MS, exp:MEAN_MS or pareto:SCALE_MS:ALPHA (positive numbers)"
        )
    return kind, numbers


class FaultInjector:
    def __init__(self, settings: FaultSettings) -> None:
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.delay = parse_delay(settings.delay) if settings.delay else None
        if settings.garbage_kind not in ("nan", "shape", "truncated", "close"):
            raise ValueError(f"garbage kind {settings.garbage_kind!r} must be nan, shape, truncated or close")
        self.started = time.monotonic()

    def verdict(self) -> Verdict:
        draw = self.rng.random()
        if draw < self.settings.error_rate:
            return Verdict.ERROR
        if draw < self.settings.error_rate + self.settings.garbage_rate:
            return Verdict.GARBAGE
        return Verdict.SERVE

    def sample_delay_s(self) -> float:
        if self.delay is None or self.rng.random() >= self.settings.delay_probability:
            return 0.0
        kind, numbers = self.delay
        if kind == "const":
            return numbers[0] / 1000
        if kind == "exp":
            return self.rng.expovariate(1000 / numbers[0])
        scale, alpha = numbers
        return scale * self.rng.paretovariate(alpha) / 1000

    def pause_remaining_s(self) -> float:
        """Inside a pause window, how long until it ends; 0 outside."""
        every, length = self.settings.pause_every_s, self.settings.pause_s
        if not every or not length:
            return 0.0
        phase = (time.monotonic() - self.started) % every
        return max(0.0, length - phase) if phase < length else 0.0

    async def before_reply(self) -> None:
        """Hold the reply for the sampled delay and any pause window."""
        delay = self.sample_delay_s() + self.pause_remaining_s()
        if delay > 0:
            await asyncio.sleep(delay)

    async def before_step(self) -> None:
        """Before each streamed resolution after the first (the step delay itself slows the compute)."""
        pause = self.pause_remaining_s()
        if pause:
            await asyncio.sleep(pause)
