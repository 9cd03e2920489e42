"""Explicitly seeded random streams for the generators (no global RNG anywhere)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class Uniform:
    """Uniform doubles in [0, 1) from a seeded PCG64, drawn in fixed-size blocks.

    Generators that make many small scalar decisions (trees, grammars) read this stream instead
    of calling numpy per draw: fast, and the same seed gives the same draws on every machine
    (PCG64 doubles are `(next_uint64 >> 11) * 2**-53`, which numpy keeps stable).
    """

    def __init__(self, seed: int | Sequence[int], block: int = 8192):
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._block = block
        self._buf: list[float] = []

    def __call__(self) -> float:
        if not self._buf:
            self._buf = self._rng.random(self._block).tolist()[::-1]
        return self._buf.pop()

    def below(self, n: int) -> int:
        """A uniform integer in [0, n)."""
        return min(int(self() * n), n - 1)

    def between(self, lo: int, hi: int) -> int:
        """A uniform integer in [lo, hi] (both included)."""
        return lo + self.below(hi - lo + 1)
