import itertools

import pytest

from redheart.schedule import Action, build_schedule, peak_in_flight, simulate


def ops(actions):
    return " ".join(str(a) for a in actions)


def test_two_stage_1f1b_order_matches_the_textbook():
    s = build_schedule("1f1b", 2, 4)
    assert ops(s[0]) == "F0 F1 B0 F2 B1 F3 B2 B3"  # 1 warm-up forward, steady 1F1B, cool-down
    assert ops(s[1]) == "F0 B0 F1 B1 F2 B2 F3 B3"  # last stage: no warm-up


@pytest.mark.parametrize("p,m", [(2, 4), (2, 8), (3, 6), (4, 8), (4, 3)])
def test_1f1b_warmup_steady_cooldown(p, m):
    for rank, actions in enumerate(build_schedule("1f1b", p, m)):
        warmup = min(p - 1 - rank, m)
        assert all(a.op == "F" for a in actions[:warmup])
        steady = actions[warmup : warmup + 2 * (m - warmup)]
        assert [a.op for a in steady] == ["F", "B"] * (m - warmup)
        assert all(a.op == "B" for a in actions[warmup + 2 * (m - warmup) :])


@pytest.mark.parametrize("p,m", [(2, 4), (2, 8), (3, 6), (4, 8), (4, 16)])
def test_peak_in_flight_1f1b_is_p_minus_rank_and_gpipe_is_m(p, m):
    for rank, actions in enumerate(build_schedule("1f1b", p, m)):
        assert peak_in_flight(actions) == min(p - rank, m)
    for actions in build_schedule("gpipe", p, m):
        assert peak_in_flight(actions) == m


@pytest.mark.parametrize(
    "kind,p,m,extra", list(itertools.product(["1f1b", "gpipe"], [1, 2, 3, 4], [1, 2, 5, 8], [0, 1, 2]))
)
def test_every_schedule_runs_each_micro_batch_once_and_never_deadlocks(kind, p, m, extra):
    schedules = build_schedule(kind, p, m, extra_warmup=extra)
    for actions in schedules:
        assert sorted((a.op, a.micro_batch) for a in actions) == sorted(
            [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
        )
        seen = set()
        for a in actions:
            if a.op == "B":
                assert ("F", a.micro_batch) in seen  # backward only after its forward
            seen.add((a.op, a.micro_batch))
    assert len(simulate(schedules)) == 2 * p * m


def test_lookahead_adds_forwards_before_the_first_backward():
    s = build_schedule("1f1b", 2, 4, extra_warmup=1)
    assert ops(s[1]) == "F0 F1 B0 F2 B1 F3 B2 B3"
    assert peak_in_flight(s[1]) == 2


def test_simulate_detects_a_deadlock():
    bad = [[Action("F", 0), Action("B", 0)], [Action("B", 0), Action("F", 0)]]
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate(bad)


@pytest.mark.parametrize(
    "args,msg",
    [
        (("zb", 2, 4), "unknown schedule"),
        (("1f1b", 0, 4), "num_stages"),
        (("1f1b", 2, 0), "num_micro_batches"),
    ],
)
def test_bad_arguments(args, msg):
    with pytest.raises(ValueError, match=msg):
        build_schedule(*args)
