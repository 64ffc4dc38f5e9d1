"""lit_rlhf: RLHF fine-tuning of Hugging Face language models with PPO, as a PyTorch Lightning module.

The LightningModules are importable from here (``lit_rlhf.PPOModule``, ``lit_rlhf.SFTModule``,
``lit_rlhf.DPOModule``, ``lit_rlhf.RewardModelModule``), the data modules from :mod:`lit_rlhf.data`, the rewards
from :mod:`lit_rlhf.rewards` and the callbacks from :mod:`lit_rlhf.callbacks`.
"""

from lit_rlhf import moved

__version__ = "0.4.0"

MODULES = ("PPOModule", "SFTModule", "DPOModule", "RewardModelModule")
"""The LightningModules, read from :mod:`lit_rlhf.modules` on first use (``import lit_rlhf`` stays light)."""

moved.install()


def __getattr__(name: str):
    if name in MODULES:
        from lit_rlhf import modules

        return getattr(modules, name)
    raise AttributeError(f"module 'lit_rlhf' has no attribute {name!r}")


__all__ = list(MODULES)
