"""kernels.block_gemm, the block-scaled integer GEMM, against its slow reference."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernels import block_gemm
from reference import ref_block_gemm


def operands(rng, m, k, n, block, a_bits, b_bits, spread, b_blocked):
    qa, qb = (1 << (a_bits - 1)) - 1, (1 << (b_bits - 1)) - 1
    a = rng.integers(-qa, qa + 1, (m, k)).astype(np.int8)
    b = rng.integers(-qb, qb + 1, (k, n)).astype(np.int8)
    blocks = -(-k // block)
    a_exp = rng.integers(-spread, spread + 1, (m, blocks)) - 20
    b_exp = rng.integers(-spread, spread + 1, (blocks, n)) if b_blocked else np.zeros((blocks, n), int)
    return a, a_exp, b, b_exp


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 5), k=st.integers(1, 70), n=st.integers(1, 5),
       block=st.sampled_from([1, 2, 8, 16, 32]), a_bits=st.integers(2, 8),
       b_bits=st.integers(2, 8), acc_bits=st.sampled_from([8, 12, 16, 24, 32, 48, 62]),
       overflow=st.sampled_from(["wrap", "saturate"]), spread=st.integers(0, 70),
       b_blocked=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_random_against_reference(m, k, n, block, a_bits, b_bits, acc_bits, overflow, spread,
                                  b_blocked, seed):
    rng = np.random.default_rng(seed)
    a, a_exp, b, b_exp = operands(rng, m, k, n, block, a_bits, b_bits, spread, b_blocked)
    c, ra, rb, counts = block_gemm(a, a_exp, b, b_exp, block=block, acc_bits=acc_bits,
                                   overflow=overflow)
    want, want_ra, want_rb, overflows = ref_block_gemm(a, a_exp, b, b_exp, block, acc_bits,
                                                       overflow)
    np.testing.assert_array_equal(c, want)
    np.testing.assert_array_equal(ra, want_ra)
    np.testing.assert_array_equal(rb, want_rb)
    assert counts == {"macs": m * n * k, "overflows": overflows}


def test_no_overflow_is_the_exact_block_scaled_product():
    rng = np.random.default_rng(0)
    a, a_exp, b, b_exp = operands(rng, 16, 96, 12, 32, 8, 8, 3, True)
    c, ra, rb, counts = block_gemm(a, a_exp, b, b_exp, block=32, acc_bits=40)
    real_a = a * np.exp2(np.repeat(a_exp, 32, axis=1))
    real_b = b * np.exp2(np.repeat(b_exp, 32, axis=0))
    np.testing.assert_array_equal(np.ldexp(c.astype(float), ra[:, None] + rb[None, :]),
                                  real_a @ real_b)
    assert counts["overflows"] == 0


def test_a_wide_exponent_spread_overflows_a_narrow_accumulator():
    a = np.full((1, 64), 100, np.int8)
    b = np.full((64, 1), 100, np.int8)
    a_exp = np.array([[0, 20]])
    wrapped = block_gemm(a, a_exp, b, block=32, acc_bits=32)
    saturated = block_gemm(a, a_exp, b, block=32, acc_bits=32, overflow="saturate")
    assert wrapped[3]["overflows"] == saturated[3]["overflows"] == 1
    assert saturated[0][0, 0] == 2**31 - 1
    exact = 320000 + (320000 << 20)
    assert wrapped[0][0, 0] == (exact + 2**31) % 2**32 - 2**31


@pytest.mark.parametrize("kwargs, words", [
    ({"block": 0}, "block"), ({"block": 32, "acc_bits": 63}, "acc_bits"),
    ({"block": 32, "overflow": "clip"}, "overflow")])
def test_bad_input_names_the_argument(kwargs, words):
    a, b = np.zeros((2, 4), np.int8), np.zeros((4, 3), np.int8)
    with pytest.raises(ValueError, match=words):
        block_gemm(a, np.zeros((2, 1), int), b, **kwargs)


def test_exponents_must_have_one_per_block():
    a, b = np.zeros((2, 40), np.int8), np.zeros((40, 3), np.int8)
    with pytest.raises(ValueError, match="a_exp"):
        block_gemm(a, np.zeros((2, 1), int), b, block=32)
