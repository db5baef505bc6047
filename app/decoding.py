"""Turns the outputs that have arrived into one answer per member: real where it exists, decoded
from the coded replicas where not, and says which is which (`approximate` never lies)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.coding import Code
from models.errors import CodingShapeError


@dataclass(frozen=True)
class Answer:
    probs: np.ndarray  # (B, C)
    resolution: int
    real: bool  # False: decoded from coded outputs

    @property
    def key(self) -> tuple[int, bool]:
        """Better answers have a higher resolution; at equal resolution a real one beats a decoded one."""
        return (self.resolution, self.real)


class Decoder:
    """One group's code: members in code order, coded replicas by coefficient row."""

    def __init__(self, members: list[str], coded_rows: dict[str, int], coeffs: np.ndarray | None, final: int) -> None:
        self.members = members
        self.index = {m: i for i, m in enumerate(members)}
        self.coded_rows = coded_rows
        self.code = Code(coeffs) if coeffs is not None and coded_rows else None
        self.final = final  # the index of the float32 resolution

    def answers(
        self,
        real: dict[str, Answer],
        coded: dict[str, Answer],
        wanted: list[str],
        decodable: set[str] | None = None,
    ) -> dict[str, Answer]:
        """Best answer per wanted member; members that can be neither seen nor decoded are absent.

        Decoding uses every real member answer and the coded outputs; its resolution is the lowest
        resolution among them. A member whose real answer is stuck below the final resolution is
        decoded too when that gives the final resolution (a straggler paused mid-stream). Only the
        members in `decodable` (all when None) may be decoded: the others keep their real answer.
        """
        out = {m: real[m] for m in wanted if m in real}
        if self.code is None or not coded:
            return out
        allowed = self.members if decodable is None else [m for m in self.members if m in decodable]
        missing = [m for m in allowed if m not in real]
        lagging = [m for m in allowed if m in real and real[m].resolution < self.final]
        for erase in (missing, missing + lagging) if lagging else (missing,):
            decoded = self._decode(erase, real, coded)
            for member, answer in decoded.items():
                if member in wanted and (member not in out or answer.key > out[member].key):
                    out[member] = answer
        return out

    def _decode(self, erase: list[str], real: dict[str, Answer], coded: dict[str, Answer]) -> dict[str, Answer]:
        if not erase or len(erase) > len(coded) or self.code is None:
            return {}
        present = {self.index[m]: a for m, a in real.items() if m not in erase and m in self.index}
        rows = {self.coded_rows[name]: a for name, a in coded.items()}
        resolution = min(a.resolution for a in (*present.values(), *rows.values()))
        try:
            solved = self.code.decode({i: a.probs for i, a in present.items()}, {r: a.probs for r, a in rows.items()})
        except CodingShapeError:
            return {}
        return {self.members[i]: Answer(p, resolution, real=False) for i, p in solved.items()}
