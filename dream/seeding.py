"""Seeds derived from several integers (a run's seed, a step or batch index, a stream number).

Adding or multiplying them (seed·K + b) makes neighbours collide: (seed, b + 1) would reuse the stream of
(seed, b)'s next use. Hashing the tuple with NumPy's SeedSequence gives every tuple its own stream."""
from __future__ import annotations

import numpy as np

from dream.errors import DreamError

SEED_LIMIT = 2**32  # --seed takes 0 .. 2^32 - 1 (the synthetic data and data order compute seed·1_000_003 + k)


def mixed_seed(*keys: int) -> int:
    """A 63-bit seed hashed from non-negative integer keys: distinct key tuples of one length, each key below
    2^32, give unrelated seeds (NumPy splits a larger key into 32-bit words and drops trailing zero words, so
    mixed_seed(3 + 2**32, 9) == mixed_seed(3, 1, 9) and mixed_seed(1, 2) == mixed_seed(1, 2, 0))."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def check_seed(seed, flag: str = "--seed") -> int:
    """seed as an int in [0, SEED_LIMIT), else a DreamError naming the flag (one line at the CLI)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise DreamError(f"{flag} must be an integer in [0, {SEED_LIMIT - 1}], got {seed!r}", same_on_every_rank=True)
    return seed

