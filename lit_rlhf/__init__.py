"""lit_rlhf: RLHF fine-tuning of Hugging Face language models with PPO, as a PyTorch Lightning module."""

__version__ = "0.1.0"
