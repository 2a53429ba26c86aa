"""The simulated devices ([system]): each distribution, availability rule, dropout and trace
against its definition (a formula in the test, a hand-worked timeline, statistics with fixed
seeds), and every bad trace refused naming the key, the file and the line."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedlt.base.seeding import hash_uniform, hash_uniforms
from fedlt.errors import ScenarioError
from fedlt.scenario.config import SystemConfig
from fedlt.system import Devices, read_availability_trace, read_speed_trace, tail_shares


def devices(
    n: int = 1000, seed: int = 0, tail: np.ndarray | None = None, model_bytes: int = 0, **cfg
) -> Devices:
    share = np.zeros(n) if tail is None else tail
    return Devices(SystemConfig(**cfg), seed, share, model_bytes)


# --------------------------------------------------------------------------- counter-based draws


def test_hash_uniforms_agree_with_hash_uniform_and_look_uniform() -> None:
    clients = np.arange(20_000, dtype=np.uint64)
    many = hash_uniforms(7, "tag", clients, 3)
    assert [hash_uniform(7, "tag", c, 3) for c in range(5)] == many[:5].tolist()
    assert many.min() >= 0 and many.max() < 1
    # Kolmogorov-Smirnov distance to U(0, 1): 1.63 / sqrt(n) is the 1% critical value.
    ks = np.max(np.abs(np.sort(many) - (np.arange(1, len(many) + 1) / len(many))))
    assert ks < 1.63 / math.sqrt(len(many))
    assert abs(np.corrcoef(many[:-1], many[1:])[0, 1]) < 0.03  # neighbours are not correlated
    assert hash_uniform(7, "tag", 1, 3) != hash_uniform(7, "tag", 1, 4) != hash_uniform(8, "tag", 1, 4)


# --------------------------------------------------------------------------- speeds


def test_constant_speed_and_the_duration_formula() -> None:
    d = devices(n=4, speed="constant", speed_mean=50.0, latency=0.5, bandwidth=1000.0, model_bytes=4000)
    assert d.speeds.tolist() == [50.0] * 4
    # download + upload: 2 (latency + bytes / bandwidth) = 2 (0.5 + 4) = 9; compute: 200 / 50 = 4.
    assert d.duration(2, 200) == pytest.approx(13.0)
    assert d.transfer_time == pytest.approx(9.0)
    assert not d.homogeneous and devices(n=4).homogeneous


def test_uniform_speeds_fill_their_range() -> None:
    s = devices(n=20_000, speed="uniform", speed_low=5.0, speed_high=25.0).speeds
    assert s.min() >= 5 and s.max() <= 25
    assert s.mean() == pytest.approx(15.0, rel=0.02)
    assert np.quantile(s, 0.25) == pytest.approx(10.0, rel=0.03)


def test_lognormal_speeds_have_the_median_and_log_spread_asked_for() -> None:
    s = devices(n=20_000, speed="lognormal", speed_mean=80.0, speed_sigma=0.7).speeds
    assert np.median(s) == pytest.approx(80.0, rel=0.03)
    assert np.log(s).std() == pytest.approx(0.7, rel=0.03)


def test_tiers_give_each_share_its_speed() -> None:
    s = devices(n=20_000, speed="tiers", speed_tiers=[[0.6, 100.0], [0.3, 20.0], [0.1, 2.0]]).speeds
    assert set(np.unique(s).tolist()) == {2.0, 20.0, 100.0}
    for speed, share in ((100.0, 0.6), (20.0, 0.3), (2.0, 0.1)):
        assert np.mean(s == speed) == pytest.approx(share, abs=0.015)


def test_a_clients_speed_does_not_depend_on_how_many_clients_there_are() -> None:
    few = devices(n=10, speed="lognormal").speeds
    many = devices(n=5000, speed="lognormal").speeds
    assert few.tolist() == many[:10].tolist()
    assert devices(n=10, seed=1, speed="lognormal").speeds.tolist() != few.tolist()


def test_tail_shares_of_a_hand_worked_federation_and_the_slowdown() -> None:
    # Global counts 100, 50, 10: with the count rule (60, 20) class 2 is the tail.
    counts = np.array([[50, 25, 0], [50, 20, 5], [0, 5, 5]])
    shares = tail_shares(counts, counts.sum(0), "count", [60, 20])
    assert shares.tolist() == pytest.approx([0.0, 5 / 75, 0.5])
    d = devices(n=3, tail=shares, speed_mean=100.0, tail_slowdown=4.0)
    assert d.speeds.tolist() == pytest.approx([100.0, 100 / (1 + 4 * 5 / 75), 100 / 3])


# --------------------------------------------------------------------------- availability


def test_bernoulli_availability_per_round_and_per_window() -> None:
    d = devices(n=4000, availability="bernoulli", availability_p=0.3)
    mask = d.available_mask(0.0, 7)
    assert mask.mean() == pytest.approx(0.3, abs=0.025)
    assert [d.available(c, 123.0, 7) for c in range(50)] == mask[:50].tolist()  # per round: time ignored
    assert (d.available_mask(0.0, 8) != mask).any()
    w = devices(n=4000, availability="bernoulli", availability_p=0.3, availability_window=10.0)
    assert (w.available_mask(0.0, 1) == w.available_mask(9.99, 5)).all()  # one draw per window
    assert (w.available_mask(10.0, 1) != w.available_mask(0.0, 1)).any()
    assert w.next_change(12.5) == 20.0
    # A client online in window 0 stays online until the first window whose draw says offline.
    c = next(c for c in range(4000) if w.available(c, 0.0, 1))
    first_off = next(k for k in range(1, 1000) if not w.available(c, k * 10.0, 1))
    assert w.online_until(c, 5.0, 1e9, 1) == first_off * 10.0
    assert w.online_until(c, 5.0, first_off * 10.0 - 1, 1) == first_off * 10.0 - 1


def test_tail_unavailability_scales_the_probability() -> None:
    shares = np.array([0.0] * 2000 + [1.0] * 2000)
    d = devices(n=4000, tail=shares, availability="bernoulli", availability_p=0.8, tail_unavailability=0.75)
    mask = d.available_mask(0.0, 1)
    assert mask[:2000].mean() == pytest.approx(0.8, abs=0.03)
    assert mask[2000:].mean() == pytest.approx(0.8 * 0.25, abs=0.03)


def test_periodic_availability_is_online_its_share_of_every_period_at_its_own_phase() -> None:
    d = devices(n=500, availability="periodic", availability_period=100.0, availability_online=0.25)
    times = np.arange(0.0, 300.0, 0.5)
    online = np.array([d.available_mask(t, 1) for t in times])
    assert online.mean(axis=0) == pytest.approx(np.full(500, 0.25), abs=0.011)
    assert len(np.unique(np.round(d.phase, 6))) == 500  # each client its own phase
    c = 3
    start = d.phase[c] + 100.0 + 10.0  # 10 s into an online stretch of 25 s
    assert d.available(c, start, 1)
    assert d.online_until(c, start, 1e9, 1) == pytest.approx(start + 15.0)
    assert not d.available(c, start + 15.0 + 1e-6, 1)
    assert d.available_mask(start, 1)[c]


def test_trace_availability_merges_intervals_and_answers_until_when(tmp_path: Path) -> None:
    path = tmp_path / "avail.csv"
    path.write_text("client,available_from,available_to\n0,0,10\n0,5,20\n0,30,40\n1,15,25\n2,100,200\n")
    d = devices(n=3, availability="trace", availability_trace=str(path))
    assert [d.available(0, t, 1) for t in (0, 12, 20, 25, 35)] == [True, True, False, False, True]
    assert d.online_until(0, 2.0, 100.0, 1) == 20.0  # [0, 10) and [5, 20) are one stretch
    assert d.online_until(0, 2.0, 15.0, 1) == 15.0
    assert d.available_mask(16.0, 1).tolist() == [True, True, False]
    assert d.next_change(25.0) == 30.0 and d.next_change(150.0) is None


def test_dropouts_happen_at_their_rate_somewhere_inside_the_round() -> None:
    d = devices(n=10, dropout=0.2)
    shares = [d.drops(c, k) for c in range(10) for k in range(1000)]
    dropped = [s for s in shares if s is not None]
    assert len(dropped) / len(shares) == pytest.approx(0.2, abs=0.015)
    assert min(dropped) >= 0 and max(dropped) < 1 and np.mean(dropped) == pytest.approx(0.5, abs=0.03)
    assert devices(n=10).drops(3, 5) is None


# --------------------------------------------------------------------------- traces


def test_speed_trace_is_read_for_every_client(tmp_path: Path) -> None:
    path = tmp_path / "speed.csv"
    path.write_text("client,speed\n1,20\n0,10.5\n2,3\n")
    assert read_speed_trace(str(path), 3).tolist() == [10.5, 20.0, 3.0]
    d = devices(n=3, speed="trace", speed_trace=str(path), tail=np.array([0, 0, 1.0]), tail_slowdown=1.0)
    assert d.speeds.tolist() == [10.5, 20.0, 1.5]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("client,speed\n0,1\n1,2\n2,3\n3,4\n", "clients 0..2"),
        ("client,speed\n0,1\n0,2\n1,1\n2,1\n", "listed twice"),
        ("client,speed\n0,1\n1,2\n", "missing, e.g. 2"),
        ("client,speed\n0,1\n1,-2\n2,1\n", "finite numbers >= 0"),
        ("client,speed\n0,1\n1,0\n2,1\n", "speeds > 0"),
        ("id,speed\n0,1\n", "header is client,speed"),
        ("client,speed\n0,fast\n", "Line 2"),
    ],
)
def test_bad_speed_traces_name_the_key_file_and_line(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "speed.csv"
    path.write_text(text)
    with pytest.raises(ScenarioError, match=r"system\.speed_trace") as info:
        read_speed_trace(str(path), 3)
    assert words in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("client,available_from,available_to\n0,5,5\n", "available_to > available_from"),
        ("client,available_from,available_to\n7,0,5\n", "names client '7'"),
        ("client,available_from,available_to\n", "at least one interval"),
        ("client,from,to\n0,0,1\n", "header is client,available_from,available_to"),
    ],
)
def test_bad_availability_traces_are_refused(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "avail.csv"
    path.write_text(text)
    with pytest.raises(ScenarioError, match=r"system\.availability_trace") as info:
        read_availability_trace(str(path), 3)
    assert words in str(info.value)


def test_a_missing_trace_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="No such file"):
        read_speed_trace(str(tmp_path / "nope.csv"), 3)
