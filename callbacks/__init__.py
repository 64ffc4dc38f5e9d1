"""Lightning callbacks that measure a lit_rlhf run (importable as ``lit_rlhf.callbacks``).

- :class:`ToxicityCallback`: toxicity, reward and summary quality on fixed held-out prompts before and after
  training (and in ``trainer.test``), with paired statistics and a report (``report.json`` / ``report.md``).
- Toxicity evaluators, P(toxic) in [0, 1]: :class:`ClassifierToxicity`, :class:`EvaluateToxicity`,
  :class:`ProfanityToxicity` (offline), all subclasses of :class:`ToxicityEvaluator`.
- :class:`PredictionWriter`: ``predict``'s summaries into ``predictions.jsonl``, atomically.
- :mod:`lit_rlhf.callbacks.stats`: the pure statistics (improvement %, BCa bootstrap CI and paired tests from scipy.stats, distinct-n).
"""

from lit_rlhf.callbacks.evaluators import (
    ClassifierToxicity,
    EvaluateToxicity,
    ProfanityToxicity,
    ToxicityEvaluator,
)
from lit_rlhf.callbacks.predictions import PredictionWriter
from lit_rlhf.callbacks.toxicity import ToxicityCallback

__all__ = [
    "ClassifierToxicity",
    "PredictionWriter",
    "EvaluateToxicity",
    "ProfanityToxicity",
    "ToxicityCallback",
    "ToxicityEvaluator",
]
