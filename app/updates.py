"""What a request asks of the fan-out (`Options`) and what the fan-out reports (`Update`): plain
data, no bytes, no transport. The surfaces render updates (app/responses.py, app/sse.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from app.decoding import Answer


@dataclass(frozen=True)
class Options:
    deadline_ms: float | None = None
    min_resolution: int = 0
    stop_margin: float | None = None
    members: list[str] | None = None
    stream: bool = False  # someone reads the refinements (SSE, /v1, a gRPC stream), not only the final
    coarse: bool = False  # parameters.coarse: every coarse resolution, even those measured no cheaper (issue 31)

    @property
    def refine(self) -> bool:
        """Coarse resolutions are asked for: someone watches, a deadline or stop margin may end the
        request before the float32 answers, or the request asks for them (`coarse`). The workers
        still skip those measured no cheaper than float32 unless `coarse` (workers/costs.py)."""
        return self.stream or self.deadline_ms is not None or self.stop_margin is not None or self.coarse


@dataclass
class Update:
    event: str  # coarse | refined | final | error
    seq: int
    elapsed_ms: float
    answers: dict[str, Answer] = field(default_factory=dict)
    members: list[str] = field(default_factory=list)
    error: str | None = None
    status: int = 200
    coarse_slower: bool = False  # coarse answers were asked for and at least one cost more than float32

    @property
    def terminal(self) -> bool:
        return self.event in ("final", "error")

    @property
    def resolution(self) -> int:
        return min((a.resolution for a in self.answers.values()), default=0)

    def exact_members(self, final_resolution: int) -> list[str]:
        return [
            m
            for m in self.members
            if m in self.answers and self.answers[m].real and self.answers[m].resolution == final_resolution
        ]

    def decoded_members(self) -> list[str]:
        return [m for m in self.members if m in self.answers and not self.answers[m].real]

    def ensemble(self) -> np.ndarray:
        ensemble: np.ndarray = np.mean([self.answers[m].probs for m in self.members], axis=0)
        return ensemble
