"""Settings the lit-rlhf command tests share: the tiny config and the flags that make a run take seconds."""

from lit_rlhf.cli import config_path

TINY = config_path("embedded_t5.yaml")  # the tiny random T5: seconds per run
FLAGS = ["--model.ppo_steps", "2", "--model.generation.max_new_tokens", "[4, 8]", "--data.batch_size", "8",
         "--trainer.enable_progress_bar", "false"]
QUICK = ["--config", TINY, *FLAGS]
