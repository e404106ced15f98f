"""Straggler profiles: parsing, seeded reproducibility, proportionality (pure, no processes)."""
import math
import statistics

import pytest

from common.errors import ConfigError
from worker.stragglers import StragglerProfile


def delays(text, rank=0, seed=0, n=200, compute=0.01):
    inj = StragglerProfile.parse(text).injector(rank, seed)
    return [inj.delay(compute) for _ in range(n)]


# ------------------------------------------------------------------ parsing
@pytest.mark.parametrize("text", ["none", "", "NONE", "  none "])
def test_none_parses_to_no_slowdown(text):
    p = StragglerProfile.parse(text)
    assert p.kind == "none"
    assert delays(text) == [0.0] * 200


def test_rank_factor_keeps_its_meaning():
    p = StragglerProfile.parse("2:3")
    assert (p.kind, p.rank, p.factor, p.text) == ("rank", 2, 3.0, "2:3")


def test_random_keeps_its_meaning():
    p = StragglerProfile.parse("random:0.2:3")
    assert (p.kind, p.prob, p.factor, p.text) == ("random", 0.2, 3.0, "random:0.2:3")


def test_pause_of_one_rank_and_of_all():
    p = StragglerProfile.parse("pause:1:50:0.5")
    assert (p.kind, p.rank, p.every, p.seconds) == ("pause", 1, 50, 0.5)
    q = StragglerProfile.parse("pause:all:10:2")
    assert (q.kind, q.rank, q.every, q.seconds) == ("pause", -1, 10, 2.0)


def test_distributions_parse_with_their_parameters():
    assert StragglerProfile.parse("dist:exp:0.5").params == (0.5,)
    p = StragglerProfile.parse("dist:lognormal:-1:0.5")
    assert (p.kind, p.dist, p.params) == ("dist", "lognormal", (-1.0, 0.5))
    assert StragglerProfile.parse("dist:uniform:0:2").params == (0.0, 2.0)


def test_profiles_combine_with_plus():
    p = StragglerProfile.parse("0:2+pause:all:5:1")
    assert p.kind == "combined"
    assert [q.kind for q in p.parts] == ["rank", "pause"]
    assert p.ranks == (0,)


@pytest.mark.parametrize("text, words", [
    ("3", "got '3'"),
    ("-1:3", "got '-1:3'"),
    ("0:0.5", "got '0:0.5'"),
    ("random:1.5:3", "got 'random:1.5:3'"),
    ("random:0.2", "got 'random:0.2'"),
    ("slow:0:3", "got 'slow:0:3'"),
    ("pause:0:10", "pause:RANK:EVERY:SECONDS"),
    ("pause:x:10:1", "RANK must be an integer"),
    ("pause:0:0:1", "EVERY must be >= 1"),
    ("pause:0:10:-1", "SECONDS must be >= 0"),
    ("pause:0:1.5:1", "EVERY must be an integer"),
    ("dist:gamma:1", "unknown distribution 'gamma'"),
    ("dist:exp", "takes 1 parameter"),
    ("dist:exp:-1", "MEAN must be >= 0"),
    ("dist:exp:nan", "must be finite"),
    ("dist:lognormal:0", "takes 2 parameter"),
    ("dist:lognormal:0:-1", "SIGMA must be >= 0"),
    ("dist:uniform:2:1", "LO <= HI"),
    ("0:3+", "every part joined by '+'"),
    ("none+0:3", "every part joined by '+'"),
])
def test_bad_profiles_fail_with_a_message_naming_them(text, words):
    with pytest.raises(ConfigError) as err:
        StragglerProfile.parse(text)
    assert words in str(err.value)
    assert isinstance(err.value, ValueError)


# ------------------------------------------------------------------ behaviour
def test_persistent_straggler_slows_only_its_rank_proportionally():
    assert delays("1:3", rank=1, n=3, compute=0.02) == pytest.approx([0.04] * 3)
    assert delays("1:3", rank=0, n=3, compute=0.02) == [0.0] * 3


@pytest.mark.parametrize("text", ["1:3", "random:0.5:4", "dist:exp:1", "dist:lognormal:0:0.5",
                                  "dist:uniform:0.5:1.5"])
def test_slowdowns_are_proportional_to_compute_time(text):
    a = delays(text, rank=1, seed=7, compute=0.01)
    b = delays(text, rank=1, seed=7, compute=0.03)
    assert any(x > 0 for x in a)
    assert b == pytest.approx([3 * x for x in a])


def test_pauses_are_absolute_seconds_whatever_the_compute():
    a = delays("pause:0:4:0.25", compute=0.001, n=12)
    b = delays("pause:0:4:0.25", compute=1.0, n=12)
    assert a == b == [0, 0, 0, 0.25] * 3


def test_pause_of_one_rank_leaves_the_others_alone():
    assert delays("pause:0:2:1", rank=1, n=10) == [0.0] * 10


def test_pause_all_pauses_every_rank_once_per_period_at_seeded_phases():
    phases = set()
    for rank in range(8):
        d = delays("pause:all:10:0.5", rank=rank, seed=3, n=100)
        hits = [i for i, x in enumerate(d) if x]
        assert len(hits) == 10 and all(b - a == 10 for a, b in zip(hits, hits[1:]))
        phases.add(hits[0])
    assert len(phases) > 1, "ranks should not all pause in lockstep"


def test_same_seed_and_rank_give_the_same_delays():
    for text in ("random:0.3:3", "dist:exp:0.5", "dist:lognormal:0:1", "pause:all:7:0.1", "0:2+random:0.1:5"):
        assert delays(text, rank=2, seed=11) == delays(text, rank=2, seed=11)


def test_other_ranks_and_seeds_draw_differently():
    for text in ("random:0.3:3", "dist:exp:0.5", "dist:lognormal:0:1", "dist:uniform:0:1"):
        base = delays(text, rank=0, seed=1)
        assert delays(text, rank=1, seed=1) != base
        assert delays(text, rank=0, seed=2) != base


def test_random_draws_match_their_probability():
    d = delays("random:0.2:3", n=5000, compute=1.0)
    assert statistics.fmean(x > 0 for x in d) == pytest.approx(0.2, abs=0.03)
    assert set(d) == {0.0, 2.0}


def test_distribution_means_match_their_parameters():
    exp = delays("dist:exp:0.5", n=20000, compute=1.0)
    assert statistics.fmean(exp) == pytest.approx(0.5, rel=0.05)
    logn = delays("dist:lognormal:-1:0.5", n=20000, compute=1.0)
    assert statistics.fmean(logn) == pytest.approx(math.exp(-1 + 0.125), rel=0.05)
    uni = delays("dist:uniform:1:3", n=20000, compute=1.0)
    assert min(uni) >= 1 and max(uni) <= 3
    assert statistics.fmean(uni) == pytest.approx(2.0, rel=0.03)


def test_combined_delays_add_up():
    both = delays("1:2+pause:1:3:0.5", rank=1, compute=0.1, n=6)
    assert both == pytest.approx([0.1, 0.1, 0.6, 0.1, 0.1, 0.6])


def test_existing_random_draw_sequence_is_unchanged():
    # the random profile draws exactly one random() per iteration from Random(f"{seed}:{rank}:{text}")
    import random
    rng = random.Random("5:1:random:0.4:2")
    expected = [1.0 if rng.random() < 0.4 else 0.0 for _ in range(50)]
    assert delays("random:0.4:2", rank=1, seed=5, n=50, compute=1.0) == expected
