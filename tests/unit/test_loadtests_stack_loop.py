"""The stack-loop harness's pure parts: what counts as a vote, and how a cycle's outcome is observed."""

from __future__ import annotations

from collections import Counter

import pytest

from loadtests.stack_loop import StackLoopConfig, votes_sent, wait_for_cycle

pytestmark = pytest.mark.unit


class FakeRegistry:
    """Plays a finetune loop: after ``after`` polls it deploys ``outcome`` ("deployed") or records a rejection."""

    def __init__(self, outcome: str, after: int = 2):
        self.outcome, self.after, self.polls = outcome, after, 0
        self._rejections: list[dict] = [{"reason": "an older refusal"}]

    def current(self, kind):
        self.polls += 1
        return "2" if self.outcome == "deployed" and self.polls > self.after else "1"

    def manifest(self, kind, version):
        return {"metrics": {"gate": {"chosen_step": 20}}}

    def rejections(self, kind):
        if self.outcome == "rejected" and self.polls > self.after:
            return [*self._rejections, {"reason": "no checkpoint passed the gate"}]
        return self._rejections


def test_abstentions_are_not_votes():
    assert votes_sent(Counter({"a": 3, "b": 2, "tie": 1, "none": 9})) == 6


@pytest.mark.parametrize("outcome,status,version", [("deployed", "deployed", "2"), ("rejected", "rejected", "1")])
def test_the_next_cycle_is_seen_as_deployed_or_rejected(outcome, status, version):
    result = wait_for_cycle(FakeRegistry(outcome), "1", rejections_before=1, timeout_s=5, poll_s=0.0)
    assert result["status"] == status and result["version"] == version
    if status == "rejected":
        assert result["reason"] == "no checkpoint passed the gate"
    else:
        assert result["gate"] == {"chosen_step": 20}


def test_a_loop_that_never_finishes_times_out():
    result = wait_for_cycle(FakeRegistry("deployed", after=10**9), "1", rejections_before=1, timeout_s=0.05, poll_s=0.01)
    assert result["status"] == "timeout" and "no cycle finished" in result["reason"]


def test_listeners_follow_the_chosen_population():
    config = StackLoopConfig(population="opposite", seed=3).listeners()
    assert config.population == "opposite" and config.seed == 3 and not config.hot_swap_probe
