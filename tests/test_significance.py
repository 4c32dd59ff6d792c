"""The paired bootstrap: its interval behaves as the statistics says, bad input is refused."""

import numpy as np
import pytest

from recsys.metrics import ndcg_of_ranks
from recsys.significance import paired_bootstrap


def test_identical_models_differ_by_exactly_zero():
    a = np.random.default_rng(0).random(500)
    result = paired_bootstrap(a, a.copy())
    assert (result.mean, result.low, result.high) == (0.0, 0.0, 0.0)
    assert not result.significantly_below


def test_a_constant_shift_has_a_zero_width_interval_at_the_shift():
    b = np.random.default_rng(1).random(300)
    result = paired_bootstrap(b - 0.25, b)
    assert result.mean == pytest.approx(-0.25)
    assert result.low == pytest.approx(-0.25) and result.high == pytest.approx(-0.25)
    assert result.significantly_below


def test_interval_width_matches_the_standard_error_and_pairing_cancels_the_user_effect():
    rng = np.random.default_rng(2)
    n = 4000
    user_effect = rng.normal(0, 1.0, n)  # shared by both models: pairing removes it
    a = user_effect + rng.normal(0.05, 0.2, n)
    b = user_effect + rng.normal(0.0, 0.2, n)
    result = paired_bootstrap(a, b, resamples=3000, seed=3)
    se = np.std(a - b, ddof=1) / np.sqrt(n)
    assert result.low < result.mean < result.high
    assert (result.high - result.low) == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert result.low > 0  # a is better beyond the noise, though the user effect is 5x its size
    assert result.users == n and result.resamples == 3000


def test_deterministic_for_a_seed_and_different_for_another():
    rng = np.random.default_rng(4)
    a, b = rng.random(200), rng.random(200)
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(a, b, seed=7)
    assert paired_bootstrap(a, b, seed=7).low != paired_bootstrap(a, b, seed=8).low


def test_many_users_resampled_in_several_chunks_keep_the_interval_honest():
    # 2**17 users: the resamples are drawn 128 at a time
    rng = np.random.default_rng(5)
    a, b = rng.random(2**17), rng.random(2**17)
    result = paired_bootstrap(a, b, resamples=300)
    se = np.std(a - b, ddof=1) / np.sqrt(a.size)
    assert result.low < result.mean < result.high
    assert (result.high - result.low) == pytest.approx(2 * 1.96 * se, rel=0.2)


@pytest.mark.parametrize(
    "a, b, kwargs, message",
    [
        ([1.0, 2.0], [1.0], {}, "same users"),
        ([], [], {}, "at least one user"),
        ([1.0, np.nan], [1.0, 2.0], {}, "finite"),
        ([1.0], [1.0], {"resamples": 0}, "resamples"),
        ([1.0], [1.0], {"level": 1.0}, "level"),
        ([1.0], [1.0], {"level": 95}, "level"),
    ],
)
def test_bad_input_is_refused_with_one_clear_message(a, b, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(np.array(a), np.array(b), **kwargs)


def test_ndcg_of_ranks():
    gains = ndcg_of_ranks(np.array([1, 3, 10, 11]), k=10)
    np.testing.assert_allclose(gains, [1.0, 0.5, 1 / np.log2(11), 0.0])
