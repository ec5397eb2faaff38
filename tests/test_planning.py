"""Planning maths on a three-group fake: no network, FLOPs and curves small enough to check by hand.

Each of groups a, b, c has 10 channels and costs 10 FLOPs per kept channel (base 300), so one
channel is 1/30 of the FLOPs. Targets sit between channel boundaries (0.19: 5.7 channels, so 6):
a target exactly on one (0.2 = 1 - 240/300, which is 0.19999999999999996 in floats) takes one
channel more, as the planner always has.
"""
from __future__ import annotations

from typing import Dict, Mapping

import pytest

from prune_callbacks.planning.allocation import (STRATEGIES, PlanGroup, Strategy, _interp_ratio, kept_count,
                                      n_keep, plan_group_ratios)

GROUPS = [PlanGroup("a", 10), PlanGroup("b", 10), PlanGroup("c", 10)]


def flops_of(counts: Mapping[int, int]) -> int:
    return sum(10 * counts.get(i, g.channels) for i, g in enumerate(GROUPS))


# a is insensitive, c is sensitive: loss per ratio
CURVES = {"a": {0.5: 0.1, 0.9: 0.2}, "b": {0.5: 0.5, 0.9: 1.0}, "c": {0.5: 1.0, 0.9: 2.0}}


def kept(ratios: Dict[str, float], groups=GROUPS, round_to: int = 1) -> Dict[str, int]:
    by_name = {g.name: g for g in groups}
    return {n: kept_count(by_name[n], r, round_to) for n, r in ratios.items()}


def test_n_keep_rounding_and_floor() -> None:
    assert n_keep(10, 0.3) == 7  # floor(3.0) go, even with float error in 0.3 * 10
    assert n_keep(10, 0.25) == 8  # floor(2.5) = 2 go
    assert n_keep(10, 0.99) == 1  # at least one stays
    assert n_keep(16, 0.3, rounding=4) == 12  # 12 kept (16 - 4), a multiple of 4
    assert n_keep(16, 0.2, rounding=4) == 16  # 13 rounds up to 16


def test_interp_ratio_is_the_largest_ratio_under_the_threshold() -> None:
    curve = [(0.0, 0.0), (0.5, 0.5), (0.9, 1.0)]
    assert _interp_ratio(curve, 0.25) == pytest.approx(0.25)  # on the first segment
    assert _interp_ratio(curve, 0.75) == pytest.approx(0.7)  # halfway along the second
    assert _interp_ratio(curve, 5.0) == 0.9  # above every loss: the last ratio
    assert _interp_ratio(curve, -1.0) == 0.0


def test_threshold_rule_then_exact_top_up() -> None:
    """By hand: with one loss threshold t (bisected), a removes floor(10*5t), b floor(10*t) and
    c floor(10*t/2) channels; the last t that removes fewer than 6 is just under 0.1, where a
    removes 4 and b 1 (5 in all). The exact step then takes the cheapest next channel: a's fifth
    (loss 0.1 at ratio 0.5) beats b's second (0.2 at 0.2) and c's first (0.2 at 0.1)."""
    ratios = plan_group_ratios(GROUPS, flops_of, CURVES, 0.19)
    assert kept(ratios) == {"a": 5, "b": 9, "c": 10}  # c, the most sensitive, stays whole
    assert ratios["a"] == 0.5  # the exact step's ratio: 5 of 10


def test_uniform_strategy_cuts_the_same_share_everywhere() -> None:
    ratios = plan_group_ratios(GROUPS, flops_of, None, 0.3, strategy="uniform")
    assert ratios == pytest.approx({"a": 0.3, "b": 0.3, "c": 0.3})
    assert plan_group_ratios(GROUPS, flops_of, None, 0.3, strategy=Strategy.UNIFORM) == ratios


def test_top_up_lands_at_or_just_above_the_target() -> None:
    """0.25 of 30 channels is 7.5: the plan removes 8 (0.2667), never 7 (0.2333)."""
    for strategy, curves in (("uniform", None), ("sensitivity", CURVES)):
        ratios = plan_group_ratios(GROUPS, flops_of, curves, 0.25, strategy=strategy)
        assert sum(10 - k for k in kept(ratios).values()) == 8, strategy


def test_skip_and_unprunable_groups_stay_whole() -> None:
    ratios = plan_group_ratios(GROUPS, flops_of, None, 0.19, skip=["a"], strategy="uniform")
    assert ratios == pytest.approx({"b": 0.3, "c": 0.3})  # the 6 channels come from b and c
    frozen = [GROUPS[0], PlanGroup("b", 10, prunable=False), GROUPS[2]]
    ratios = plan_group_ratios(frozen, flops_of, None, 0.19, strategy="uniform")
    assert ratios == pytest.approx({"a": 0.3, "c": 0.3})


def test_round_to_keeps_multiples() -> None:
    groups = [PlanGroup(n, 16) for n in "abc"]

    def flops(counts: Mapping[int, int]) -> int:
        return sum(counts.get(i, 16) for i in range(3))

    ratios = plan_group_ratios(groups, flops, None, 0.25, strategy="uniform", round_to=4)
    counts = kept(ratios, groups, round_to=4)
    assert counts == {"a": 12, "b": 12, "c": 12}  # 12 of 48 gone, each count a multiple of 4


def test_blocks_of_grouped_convs_lose_the_same_count() -> None:
    g = PlanGroup("g", 10, units=(5, 5))
    assert kept_count(g, 0.4) == 6  # 2 of each block of 5
    assert kept_count(g, 0.4, round_to=4) == 6  # round_to does not apply to blocks


def test_groups_with_allowed_widths_keep_only_those() -> None:
    """A routed group (ShuffleNetV2 stage): 2 producers of 10 channels, each keeping one of
    the widths {1, 2, 3, 8, 9, 10}; ratios round to the nearest (the smaller on a tie)."""
    allowed = (1, 2, 3, 8, 9, 10)

    def nearest(width: int) -> int:
        return min(allowed, key=lambda a: (abs(a - width), a))

    routed = PlanGroup("r", 20, (10, 10), round_width=nearest)
    assert kept_count(routed, 0.5) == 2 * 3 and kept_count(routed, 0.2) == 2 * 8
    assert kept_count(routed, 0.35) == 2 * 8  # 6.5 -> 6 kept (round half to even), nearer 8
    groups = [routed, PlanGroup("b", 10)]

    def flops(counts: Mapping[int, int]) -> int:
        return 10 * counts.get(0, 20) + 20 * counts.get(1, 10)

    ratios = plan_group_ratios(groups, flops, None, 0.4, strategy="uniform")
    counts = {i: kept_count(groups[i], ratios.get(g.name, 0.0)) for i, g in enumerate(groups)}
    assert counts[0] // 2 in allowed and counts[0] < 20
    assert 1 - flops(counts) / flops({}) >= 0.4


def test_unreachable_target_names_the_reachable_one() -> None:
    # curves stop at 0.9: every group keeps at least 1 of 10 -> at most 0.9 reachable
    with pytest.raises(ValueError, match=r"0\.950 cannot be reached.* is 0\.900"):
        plan_group_ratios(GROUPS, flops_of, CURVES, 0.95)
    half = {n: {0.5: 0.1} for n in "abc"}
    with pytest.raises(ValueError, match=r"largest reachable with these groups and sensitivity "
                                         r"ratios is 0\.500"):
        plan_group_ratios(GROUPS, flops_of, half, 0.6)


@pytest.mark.parametrize("kwargs,match", [
    ({"flops": 0.0}, r"fraction in \(0, 1\)"),
    ({"flops": 1.0}, r"fraction in \(0, 1\)"),
    ({"flops": True}, r"fraction in \(0, 1\)"),
    ({"strategy": "greedy"}, r"unknown strategy 'greedy'; choose one of \('sensitivity', 'uniform'\)"),
    ({"curves": None}, "needs sensitivities"),
    ({"skip": ["a", "b", "c"]}, "no group can be pruned"),
    ({"curves": {}}, "no group can be pruned"),
])
def test_bad_arguments(kwargs: Dict, match: str) -> None:
    args = dict(groups=GROUPS, flops_fn=flops_of, curves=CURVES, flops=0.2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        plan_group_ratios(**args)


def test_strategies_are_the_enum_values() -> None:
    assert STRATEGIES == ("sensitivity", "uniform") == tuple(s.value for s in Strategy)
