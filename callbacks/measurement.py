"""What ToxicityCallback measures on: the held-out prompts (one per distinct dialogue, with all its references),
one pass's scores over them (:class:`Measurement`), and a 'before' pass kept in a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lit_rlhf.runtime import plain_values


@dataclass
class HeldOutPrompt:
    """One held-out dialogue: its first row in the data module's ``test_set`` and all its reference summaries."""

    row: int
    id: str
    query: str
    references: list[str]
    """Every reference summary of this dialogue in the held-out split (DialogSum's test split has three)."""
    duplicates: int = 0
    """Further held-out rows with the same prompt, merged into this one (measured once, their references pooled)."""


@dataclass
class Measurement:
    """One generation pass over the held-out prompts, in prompt order."""

    stage: str
    ids: list[str] = field(default_factory=list)
    """The prompts' ids, in order (the same list before and after)."""
    responses: list[str] = field(default_factory=list)
    toxicity: list[float] = field(default_factory=list)
    reward: list[float] = field(default_factory=list)
    length: list[int] = field(default_factory=list)
    """Response length in tokens (end-of-sequence included)."""
    ppo_step: int = 0
    global_step: int = 0
    seconds: float = 0.0
    pass_at_k: list[float] = field(default_factory=list)
    """Per prompt, with ``ToxicityCallback(pass_at_k=k)``: 1.0 when one of its k samples has reward > 0, else 0.0."""
    sample_reward: list[float] = field(default_factory=list)
    """Per prompt, with ``pass_at_k``: the mean reward of its k samples."""


def pass_at_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """k sampled rewards per prompt, ``[B * k]`` with a prompt's k contiguous -> (pass@k [B]: 1.0 where one of them
    is > 0, for a 0/1 reward "one answer was right"; their mean [B])."""
    grouped = scores.reshape(-1, k)
    return (grouped > 0).any(1).to(scores.dtype), grouped.mean(1)


def select_prompts(test_set: Any, num_prompts: int | None, reference_column: str | None = "summary") -> list[HeldOutPrompt]:
    """The first ``num_prompts`` distinct dialogues of the held-out rows, each with all its references (the
    values of ``reference_column``; none when it is None or absent).

    DialogSum's test split lists each dialogue once per reference summary (ids ``test_{n}_{k}``); grouping by
    dialogue text measures each dialogue once and scores ROUGE against all of its references. Each prompt counts
    the rows merged into it (``duplicates``), which the report states.
    """
    columns = test_set.column_names
    key_column = "dialogue" if "dialogue" in columns else "query"
    keys = test_set[key_column]
    has_references = reference_column is not None and reference_column in columns
    summaries = test_set[reference_column] if has_references else [None] * len(keys)
    ids, queries = test_set["id"], test_set["query"]
    groups: dict[str, HeldOutPrompt] = {}
    for row, key in enumerate(keys):
        if key not in groups:
            groups[key] = HeldOutPrompt(row=row, id=str(ids[row]), query=queries[row], references=[])
        else:
            groups[key].duplicates += 1
        if summaries[row] is not None:
            groups[key].references.append(summaries[row])
    prompts = list(groups.values())
    if num_prompts is not None:
        prompts = prompts[:num_prompts]
    if not prompts:
        raise ValueError("ToxicityCallback: the data module's test_set is empty; raise data.test_size")
    return prompts


def stored_before(state: dict[str, Any] | None, signature: dict[str, Any], purpose: str) -> Measurement | None:
    """The 'before' measurement saved in a checkpoint (``ToxicityCallback.state_dict``), if it was made on the
    same prompts and settings (``signature``: what makes two measurements comparable).

    A run keeps its first 'before' through every resume: the checkpoint holds it, and the report compares it
    with the end. When the prompts or settings differ it cannot be compared; the warning names them."""
    if not state or "before" not in state:
        return None
    # tuples may come back from a checkpoint as lists: compare plain values
    stored, mine = plain_values(state.get("signature") or {}), plain_values(signature)
    differing = [key for key in mine if stored.get(key) != mine[key]]
    if differing:
        settings = ", ".join("held-out prompts" if key == "prompt_ids" else key for key in differing)
        again = "it is measured again now, on this model" if purpose == "resuming" else "the report has no 'before'"
        step = state["before"]["ppo_step"]
        rank_zero_warn(f"ToxicityCallback: the checkpoint's 'before' measurement (PPO step {step}) used other "
                       f"{settings}, so it is not used when {purpose}: {again}")
        return None
    rank_zero_info(f"ToxicityCallback: using the 'before' measurement stored in the checkpoint ({purpose})")
    return Measurement(**state["before"])
