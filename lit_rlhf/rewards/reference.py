"""Reward for summary quality: ROUGE of the response against the reference summary."""

from typing import Literal

import torch

from lit_rlhf.rewards.base import Reward, check_choice


class ReferenceSimilarityReward(Reward):
    """ROUGE of each response against its reference (e.g. the reference summary), in [0, 1].

    Added to a toxicity reward, it keeps the policy from trading summary quality for a higher toxicity score.
    Needs ``references`` in each call. Tokenisation is torchmetrics' default (lowercased alphanumeric words),
    without stemming, so it needs neither nltk nor network.
    """

    def __init__(
        self,
        rouge_key: Literal["rouge1", "rouge2", "rougeL"] = "rouge1",
        measure: Literal["fmeasure", "precision", "recall"] = "fmeasure",
    ) -> None:
        """
        Args:
            rouge_key: ``rouge1``: unigram overlap; ``rouge2``: bigram overlap; ``rougeL``: longest common
                subsequence.
            measure: ``fmeasure`` (F1), ``precision`` (share of the response found in the reference) or
                ``recall`` (share of the reference found in the response).
        """
        super().__init__()
        check_choice(rouge_key, self.flag("rouge_key"), ("rouge1", "rouge2", "rougeL"))
        check_choice(measure, self.flag("measure"), ("fmeasure", "precision", "recall"))
        self.rouge_key = rouge_key
        self.measure = measure

    @property
    def name(self) -> str:
        return f"{self.rouge_key}_{self.measure}"

    def needs_references(self) -> bool:
        return True

    def describe(self) -> str:
        return f"{self.rouge_key} {self.measure} of the response against the reference"

    def compute(self, prompts: list[str], responses: list[str], references: list[str] | None) -> torch.Tensor:
        if references is None or any(r is None for r in references):
            raise ValueError(
                f"{type(self).__name__} compares responses with references, and these prompts have none: set "
                "data.reference_column (or call it with `references=`)."
            )
        from torchmetrics.functional.text.rouge import rouge_score

        key = f"{self.rouge_key}_{self.measure}"
        # rouge_score averages over a batch, so each pair is scored on its own.
        scores = [rouge_score(r, ref, rouge_keys=self.rouge_key)[key] for r, ref in zip(responses, references)]
        return torch.stack(scores).float() if scores else torch.empty(0)
