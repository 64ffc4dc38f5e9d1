"""The commands lit-rlhf, lit-rlhf-sft, lit-rlhf-rm and lit-rlhf-dpo (LightningCLI).

base.py: what every command shares (parser settings, one-line errors, resume from a run folder, harmless
warnings); configs.py: packaged configs by name, the default config, a run's own config.yaml; ppo.py, sft.py,
preferences.py: one command family each. The top layer: it may import every other part of lit_rlhf.
"""

from lit_rlhf.cli.base import one_line_errors, quiet_harmless_warnings
from lit_rlhf.cli.configs import (
    DEFAULT_CONFIG, SUBCOMMANDS, config_path, needed_subcommands, packaged_configs, resolve_configs,
    with_default_config,
)
from lit_rlhf.cli.ppo import LitRLHFCLI, main, run
from lit_rlhf.cli.preferences import main_dpo, main_rm, run_dpo, run_rm
from lit_rlhf.cli.sft import main_sft, run_sft

__all__ = [
    "DEFAULT_CONFIG",
    "LitRLHFCLI",
    "SUBCOMMANDS",
    "config_path",
    "main",
    "main_dpo",
    "main_rm",
    "main_sft",
    "needed_subcommands",
    "one_line_errors",
    "packaged_configs",
    "quiet_harmless_warnings",
    "resolve_configs",
    "run",
    "run_dpo",
    "run_rm",
    "run_sft",
    "with_default_config",
]
