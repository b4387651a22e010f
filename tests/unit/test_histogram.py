import random

from routerq.core.histogram import bucket, bucket_value, percentiles


def test_a_percentile_from_buckets_is_within_three_percent_of_the_exact_one() -> None:
    rng = random.Random(7)
    latencies = [rng.lognormvariate(6, 0.8) for _ in range(20_000)]
    counts: dict[int, int] = {}
    for ms in latencies:
        counts[bucket(ms)] = counts.get(bucket(ms), 0) + 1
    ordered = sorted(latencies)
    got = percentiles(counts, (0.5, 0.95, 0.99))
    for q, value in got.items():
        exact = ordered[int(q * len(ordered)) - 1]
        assert value is not None and abs(value - exact) / exact < 0.03, (q, value, exact)


def test_sub_millisecond_latencies_share_the_first_bucket_and_an_empty_histogram_has_no_percentiles() -> None:
    assert bucket(0.2) == bucket(0.9) == 0 and bucket_value(0) < 1
    assert percentiles({}, (0.5,)) == {0.5: None}
    assert percentiles({bucket(100.0): 1}, (0.5, 0.99)) == {
        0.5: bucket_value(bucket(100.0)),
        0.99: bucket_value(bucket(100.0)),
    }
