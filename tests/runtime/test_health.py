"""Degenerate rollout batches: empty responses, zero entropy, and the warning after N in a row."""

import pytest
import torch

from lit_rlhf.runtime import DegenerateWatch, degenerate_reason, degenerate_rollout


def test_all_empty_responses_are_degenerate():
    # a policy that emits only <pad>/<eos>: no response token at all
    assert "every response is empty" in degenerate_rollout(torch.zeros(4, 6), torch.zeros(4, 6))
    # one non-empty response is enough to be healthy on length
    mask = torch.zeros(4, 6)
    mask[2, :3] = 1
    assert degenerate_rollout(mask, torch.full((4, 6), 0.7)) is None


def test_zero_entropy_on_response_tokens_is_degenerate_and_padding_is_ignored():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # entropy 0 on the three response tokens; large values on padding must not count
    entropy = torch.tensor([[0.0, 0.0, 5.0], [0.0, 9.0, 9.0]])
    assert "mean entropy is 0.00e+00 nats" in degenerate_rollout(mask, entropy)
    entropy = torch.tensor([[0.3, 0.0, 5.0], [0.0, 9.0, 9.0]])  # mean over response tokens: 0.3 / 3 = 0.1
    assert degenerate_rollout(mask, entropy) is None
    assert "1.00e-01 nats" in degenerate_rollout(mask, entropy, entropy_floor=0.2)
    assert degenerate_reason(5.0, 0.099, entropy_floor=0.1) is not None
    assert degenerate_reason(5.0, 0.1, entropy_floor=0.1) is None
    assert degenerate_reason(5.0, None) is None  # entropy not measured: only the length is judged


def test_watch_warns_once_per_streak_of_patience_batches():
    watch = DegenerateWatch(patience=3)
    bad, good = "every response is empty", None
    lines = [watch.update(r, step) for step, r in enumerate([bad, bad, good, bad, bad, bad, bad, bad], start=1)]
    # the healthy step 3 resets the count: the warning comes at step 6 (third in a row), and only once
    assert [i for i, line in enumerate(lines, start=1) if line] == [6]
    assert lines[5].startswith("PPO step 6: degenerate rollouts for 3 steps in a row: every response is empty")
    resumed = DegenerateWatch(patience=3)
    resumed.load_state_dict(DegenerateWatch(patience=3, streak=2).state_dict())
    assert resumed.update(bad, 9) is not None  # the count survives a checkpoint
    with pytest.raises(ValueError, match="patience"):
        DegenerateWatch(patience=0)
