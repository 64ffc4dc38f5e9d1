"""Shared fixtures: embedded tiny models built once per session into a temporary cache."""

import os

import pytest
import torch

# Tiny models on 2 cores: one thread avoids oversubscription and is faster for these sizes.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def embedded_cache(tmp_path_factory):
    """Build embedded models into a per-session cache, unless the environment already names one."""
    if "LIT_RLHF_CACHE" not in os.environ:
        os.environ["LIT_RLHF_CACHE"] = str(tmp_path_factory.mktemp("lit_rlhf_cache"))
    return os.environ["LIT_RLHF_CACHE"]
