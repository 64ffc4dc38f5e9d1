"""The strategy overlays (configs/strategy/*.yaml) parsed with a recipe and their strategies instantiated (FSDP and
DeepSpeed need GPUs: here they are only parsed and instantiated), and gradient clipping under each strategy
(mocked). The 2-process DDP fit: test_ddp.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace
from typing import Union

import lightning as L
import pytest
import torch
import yaml
from torch.testing import assert_close

from lit_rlhf.cli import run

ROOT = Path(__file__).parents[2]
OVERLAYS = sorted((ROOT / "configs" / "strategy").glob("*.yaml"))
RECIPE = ROOT / "configs" / "detox_flan_t5.yaml"


# ------------------------------------------------------------------ strategy overlays (GPU strategies: parse only)


def test_strategy_overlays_exist():
    assert {p.name for p in OVERLAYS} >= {"ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml",
                                          "bf16.yaml"}


def print_config(*configs: Path, capsys) -> dict:
    args = ["fit"]
    for config in configs:
        args += ["--config", str(config)]
    with pytest.raises(SystemExit) as exit_info:
        run([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def instantiate_strategy(strategy_config):
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=Union[str, Strategy])
    return parser.instantiate(parser.parse_object({"strategy": strategy_config})).strategy


def skip_without_deepspeed(overlay: Path) -> None:
    if "deepspeed" in overlay.name and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (optional, GPU only): its strategy cannot be instantiated here")


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_strategy_overlay_parses_with_a_recipe(overlay, capsys):
    try:
        printed = print_config(RECIPE, overlay, capsys=capsys)
    except ImportError as err:  # a strategy class that needs a missing package
        pytest.skip(f"{overlay.name}: the strategy's package is not installed ({err})")
    source = yaml.safe_load(overlay.read_text())["trainer"]
    trainer = printed["trainer"]
    assert printed["model"]["model_name"] == "google/flan-t5-base"  # the recipe is still there
    if "strategy" in source:
        assert trainer["strategy"]["class_path"] == source["strategy"]["class_path"]
        for key, value in source["strategy"]["init_args"].items():
            expected = sorted(value) if isinstance(value, list) else value  # a set prints sorted
            got = sorted(trainer["strategy"]["init_args"][key]) if isinstance(value, list) else trainer["strategy"]["init_args"][key]
            assert got == expected, key
    if "precision" in source:
        assert trainer["precision"] == source["precision"]


@pytest.mark.parametrize("overlay", [p for p in OVERLAYS if p.name != "bf16.yaml"], ids=lambda p: p.name)
def test_strategy_overlay_instantiates(overlay):
    """The strategy object the overlay describes can be built (on CPU; running FSDP/DeepSpeed needs GPUs)."""
    skip_without_deepspeed(overlay)
    strategy = instantiate_strategy(yaml.safe_load(overlay.read_text())["trainer"]["strategy"])
    name = overlay.stem
    if name == "ddp":
        assert type(strategy).__name__ == "DDPStrategy" and strategy._ddp_kwargs["find_unused_parameters"] is False
    elif name == "fsdp":
        from lit_rlhf.runtime import DeclaredBlocksWrapPolicy

        # each block the model declares (_no_split_modules) is its own FSDP unit (tests/models/test_memory.py)
        assert isinstance(strategy.kwargs["auto_wrap_policy"], DeclaredBlocksWrapPolicy)
        # LoRA leaves frozen and trainable weights in one block: FSDP needs use_orig_params for that
        assert strategy.kwargs["use_orig_params"] is True
        assert strategy._state_dict_type == "full"
    else:
        stage = int(name[-1])
        assert strategy.config["zero_optimization"]["stage"] == stage


def test_strategy_overlays_combine(capsys):
    overlays = ROOT / "configs" / "strategy"
    printed = print_config(RECIPE, overlays / "ddp.yaml", overlays / "bf16.yaml", capsys=capsys)
    assert printed["trainer"]["strategy"]["class_path"] == "lightning.pytorch.strategies.DDPStrategy"
    assert printed["trainer"]["precision"] == "bf16-mixed"


def test_bf16_overlay_runs_a_ppo_step_on_cpu(tmp_path, monkeypatch):
    """bf16 autocast runs on CPU too: values and log-probs stay float32, so the rollout buffers accept them."""
    monkeypatch.chdir(tmp_path)
    cli = run(["fit", "--config", str(ROOT / "configs" / "embedded_t5.yaml"),
               "--config", str(ROOT / "configs" / "strategy" / "bf16.yaml"),
               "--trainer.callbacks", "[]", "--trainer.logger", "false", "--trainer.limit_val_batches", "0",
               "--trainer.enable_progress_bar", "false", "--model.export_adapter", "false",
               "--model.ppo_steps", "1", "--model.generation.max_new_tokens", "[4, 8]", "--data.batch_size", "8",
               "--model.fast_rollout", "false"])  # exact mode: KL exactly 0
    assert cli.trainer.precision == "bf16-mixed" and cli.model.ppo_step == 1
    metrics = cli.trainer.callback_metrics
    assert float(metrics["kl"]) == 0.0 and torch.isfinite(metrics["reward"])
    assert all(p.dtype == torch.float32 for p in cli.model.policy.parameters())  # autocast: weights stay float32


# ------------------------------------------------------------------ gradient clipping under each strategy (mocked)


class ClipProbe(L.LightningModule):
    """One weight whose gradient has norm 10 (6, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2))
        self.weight.grad = torch.tensor([6.0, 8.0])


def deepspeed_strategy(config: dict):
    """A DeepSpeedStrategy as the module sees it in setup (DeepSpeed itself is not needed: no __init__)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    strategy.config = config
    return strategy


def test_clip_grad_norm_clips_as_each_strategy_allows():
    from unittest import mock

    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from lit_rlhf.runtime import clip_grad_norm

    # one process: Lightning's clip_gradients scales the gradient to norm 1
    module, trainer = ClipProbe(), L.Trainer(accelerator="cpu", devices=1, logger=False)
    module.trainer = trainer
    opt = torch.optim.SGD(module.parameters(), lr=1.0)
    clip_grad_norm(module, opt, 1.0)
    assert_close(module.weight.grad, torch.tensor([0.6, 0.8]))
    # FSDP: the root FSDP module's own clip_grad_norm_ (a norm over every rank's shard); Lightning's
    # clip_gradients would raise here ("gradient_clip_algorithm='norm' is currently not supported")
    module = ClipProbe()
    strategy = FSDPStrategy()
    strategy.model = mock.MagicMock(spec=FSDP)
    module.trainer = SimpleNamespace(strategy=strategy)
    clip_grad_norm(module, opt, 1.0)
    strategy.model.clip_grad_norm_.assert_called_once_with(1.0)
    # DeepSpeed: its optimizer step clips (configure_grad_clipping put the norm into its config); nothing here
    module.trainer = SimpleNamespace(strategy=deepspeed_strategy({"gradient_clipping": 1.0}))
    clip_grad_norm(module, opt, 1.0)
    assert torch.equal(module.weight.grad, torch.tensor([6.0, 8.0]))


def test_ppo_max_grad_norm_goes_into_deepspeed_config_or_is_refused_in_setup():
    from lit_rlhf.modules import PPOModule
    from lit_rlhf.settings import PPOSettings

    module = PPOModule(ppo=PPOSettings(max_grad_norm=1.0), export_adapter=False)
    strategy = deepspeed_strategy({"zero_optimization": {"stage": 3}})
    module.trainer = SimpleNamespace(strategy=strategy, datamodule=None, world_size=2)
    module.setup("fit")
    assert strategy.config["gradient_clipping"] == 1.0  # DeepSpeed's step clips at the PPO setting
    # another value in the DeepSpeed config: refused before the policy loads, naming both settings
    strategy.config["gradient_clipping"] = 0.5
    with pytest.raises(ValueError, match=r"model.ppo.max_grad_norm=1.0 and the DeepSpeed config's gradient_clipping=0.5"):
        module.setup("fit")
    assert "policy" not in module._modules


@pytest.mark.parametrize("module_class", ["lit_rlhf.SFTModule", "lit_rlhf.DPOModule",
                                          "lit_rlhf.RewardModelModule"])
def test_trainer_gradient_clip_val_under_fsdp_is_refused_in_setup(module_class):
    import importlib

    from lightning.pytorch.strategies import FSDPStrategy

    path, name = module_class.rsplit(".", 1)
    module = getattr(importlib.import_module(path), name)()
    module.trainer = SimpleNamespace(strategy=FSDPStrategy(), gradient_clip_val=1.0, datamodule=None)
    with pytest.raises(ValueError, match="trainer.gradient_clip_val=1.0 is not available under FSDP"):
        module.setup("fit")
    assert "policy" not in module._modules and getattr(module, "model", None) is None  # nothing loaded yet
