"""Seeds from several integers (dream/seeding.py): every key tuple its own stream; --seed's range."""
import itertools

import pytest

from dream.errors import DreamError
from dream.seeding import SEED_LIMIT, check_seed, mixed_seed


def test_each_key_tuple_gets_its_own_63_bit_seed():
    """Tuples of one length (as every caller's are), neighbours and permutations included: (seed, step, stream)
    and (step, seed, stream) are other streams, as are (seed, b + 1) and the next use of (seed, b), which
    seed·K + b arithmetic would make collide."""
    keys = list(itertools.product(range(4), range(4), range(3)))
    seeds = [mixed_seed(*key) for key in keys]
    assert len(set(seeds)) == len(keys)
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert mixed_seed(2, 1, 0) == seeds[keys.index((2, 1, 0))]  # a function of the keys alone
    assert mixed_seed(5, 7) != mixed_seed(7, 5)


def test_check_seed_takes_exactly_the_32_bit_range():
    assert check_seed(0) == 0 and check_seed(SEED_LIMIT - 1) == SEED_LIMIT - 1 == 2**32 - 1
    for bad in (-1, SEED_LIMIT, True, 1.0, "3", None):
        with pytest.raises(DreamError, match=rf"^--sample-seed must be an integer in \[0, 4294967295\], got "
                                             rf"{bad!r}$"):
            check_seed(bad, "--sample-seed")
