"""Poisson subsampling and chunking."""
import numpy as np
import pytest

from dpdm_jax.dp.sampling import PoissonSampler


def test_batch_size_mean_and_variance():
    n, q, steps = 2000, 0.05, 3000
    s = PoissonSampler(dataset_size=n, sampling_rate=q, chunk_size=16)
    sizes = np.array([len(s.batch_indices(3, t)) for t in range(steps)])
    mean, var = n * q, n * q * (1 - q)
    # Standard errors: sqrt(var/steps) ~ 0.18 for the mean; ~2.6% relative for the variance.
    assert abs(sizes.mean() - mean) < 5 * np.sqrt(var / steps)
    assert abs(sizes.var(ddof=1) / var - 1) < 5 * np.sqrt(2 / (steps - 1))


def test_membership_is_independent_per_example():
    s = PoissonSampler(dataset_size=50, sampling_rate=0.3, chunk_size=8)
    counts = np.zeros(50)
    for t in range(4000):
        counts[s.batch_indices(0, t)] += 1
    freq = counts / 4000
    assert np.all(np.abs(freq - 0.3) < 5 * np.sqrt(0.3 * 0.7 / 4000))


def test_chunks_cover_batch_exactly_with_padding():
    s = PoissonSampler(dataset_size=1000, sampling_rate=0.1, chunk_size=24, num_devices=8)
    seen_counts = set()
    for t in range(30):
        batch = s.batch_indices(1, t)
        chunks = s.chunks(1, t)
        assert len(chunks) == -(-len(batch) // 24)
        seen_counts.add(len(chunks))
        assert all(c.indices.shape == (24,) and c.mask.shape == (24,) for c in chunks)
        real = np.concatenate([c.indices[c.mask] for c in chunks]) if chunks else np.array([], int)
        np.testing.assert_array_equal(real, batch)  # nothing truncated, nothing duplicated
        for c in chunks[:-1]:
            assert c.mask.all()
        if chunks:
            last = chunks[-1]
            assert last.mask.sum() == len(batch) - 24 * (len(chunks) - 1)
            assert np.all(last.indices[~last.mask] == 0)
    assert len(seen_counts) > 1, "the number of chunks should vary from step to step"


def test_resumed_sampler_replays_same_batches():
    a = PoissonSampler(dataset_size=500, sampling_rate=0.2, chunk_size=10)
    first = [a.batch_indices(42, t) for t in range(20)]
    b = PoissonSampler(dataset_size=500, sampling_rate=0.2, chunk_size=10)
    # A resumed run starts at step 10 without replaying steps 0..9.
    for t in range(10, 20):
        np.testing.assert_array_equal(b.batch_indices(42, t), first[t])
    c = PoissonSampler(dataset_size=500, sampling_rate=0.2, chunk_size=10)
    assert not all(np.array_equal(c.batch_indices(43, t), first[t]) for t in range(20))
    assert not np.array_equal(first[0], first[1])


def test_empty_batch_gives_no_chunks():
    s = PoissonSampler(dataset_size=3, sampling_rate=1e-9, chunk_size=2)
    assert s.chunks(0, 0) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dataset_size=10, sampling_rate=0.0, chunk_size=2), "sampling_rate"),
        (dict(dataset_size=10, sampling_rate=1.5, chunk_size=2), "sampling_rate"),
        (dict(dataset_size=0, sampling_rate=0.5, chunk_size=2), "dataset_size"),
        (dict(dataset_size=10, sampling_rate=0.5, chunk_size=6, num_devices=4), "multiple of the device count"),
    ],
)
def test_invalid_sampler(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PoissonSampler(**kwargs)


def test_sampler_holds_no_seed():
    """The secret seed is an argument of each call, so the sampler's repr cannot print it."""
    seed = 2**61 + 123456789
    s = PoissonSampler(dataset_size=50, sampling_rate=0.3, chunk_size=8)
    s.batch_indices(seed, 0)
    assert str(seed) not in repr(s) and "seed" not in repr(s)
    assert all(not isinstance(v, int) or v < 2**32 for v in vars(s).values())
