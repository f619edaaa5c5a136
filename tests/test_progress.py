"""training.progress: trainers' loops report each finished step to whoever set a reporter (a round,
which records it in the registry for the app's banner), and nothing changes without one."""

from __future__ import annotations

from training.progress import StepProgress, reporting, tracked


def test_tracked_loops_report_each_finished_step_with_the_time_left() -> None:
    heard: list[StepProgress] = []
    seen = []
    with reporting(heard.append):
        for i in tracked(range(4), "SFT", show_bar=False):
            seen.append(i)
            assert len(heard) == i  # a step is reported once its body has run
    assert seen == [0, 1, 2, 3]
    assert [(p.what, p.done, p.total) for p in heard] == [("SFT", k, 4) for k in range(1, 5)]
    assert heard[-1].eta_s == 0 and heard[0].eta_s >= 0


def test_without_a_reporter_a_tracked_loop_is_a_plain_loop() -> None:
    assert list(tracked(iter("abc"), "x", total=3, show_bar=False)) == ["a", "b", "c"]
    assert StepProgress("x", 0, 5, 1.0).eta_s is None and StepProgress("x", 2, 4, 10.0).eta_s == 10.0
