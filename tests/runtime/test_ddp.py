"""Several processes: a 2-process DDP fit on CPU (gloo), the reduction helpers across ranks, the strategy overlays.

The DDP fit runs ``tests/ddp_worker.py`` in a subprocess: Lightning's ``ddp`` launcher starts rank 1 by
re-executing the command line, which cannot be pytest's. FSDP and DeepSpeed need GPUs; here their overlays
are only parsed and their strategies instantiated.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Union

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.testing import assert_close

from lit_rlhf import objectives
from lit_rlhf.cli import run
from lit_rlhf.models import resolve_model_path

ROOT = Path(__file__).parents[2]
WORKER = Path(__file__).parents[1] / "ddp_worker.py"
OVERLAYS = sorted((ROOT / "configs" / "strategy").glob("*.yaml"))
RECIPE = ROOT / "configs" / "detox_flan_t5.yaml"
PPO_STEPS, BATCH, WORLD = 3, 8, 2  # as the worker runs it
# environment that would make Lightning believe it runs inside an existing cluster job
CLUSTER_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


# ------------------------------------------------------------------ a 2-process DDP fit


def run_worker(run_dir: Path, *extra: str) -> SimpleNamespace:
    """Runs the worker once; returns both ranks' records, the run folder and the output."""
    resolve_model_path("embedded:tiny-t5")  # build here once, rather than in both ranks at the same time
    env = {k: v for k, v in os.environ.items()
           if k not in CLUSTER_VARIABLES and not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # its own process group, so that a timeout can stop rank 1 too (rank 0 starts it)
    proc = subprocess.Popen([sys.executable, str(WORKER), str(run_dir / "out"), *extra], cwd=run_dir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the 2-process DDP fit did not finish in 300 s:\n{output[-6000:]}")
    assert proc.returncode == 0, output[-6000:]
    # a CPU DDP run that leaves its process group up may abort at exit; run() destroys it
    assert "terminate called" not in output, output[-6000:]
    records = [torch.load(run_dir / "out" / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return SimpleNamespace(ranks=records, dir=run_dir, output=output)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("ddp"))


def test_grpo_with_micro_batches_under_ddp_keeps_identical_weights_without_a_value_head(tmp_path):
    # each process samples whole groups (its prompts x k); group statistics and the loss are reduced globally.
    # Micro-batches of 2 rows: DDP all-reduces each mini-batch's gradient once, in its last micro-batch's
    # backward (the first keeps its gradient on the process), and the ranks stay bit-identical.
    run = run_worker(tmp_path, "--model.ppo.advantage_estimator", "grpo", "--model.samples_per_prompt", "2",
                     "--data.batch_size", "4", "--model.fast_rollout", "true", "--model.ppo_steps", "2",
                     "--model.micro_batch_size", "2")
    rank0, rank1 = run.ranks
    assert rank0["ppo_step"] == rank1["ppo_step"] == 2 == len(rank0["step_stats"])
    for record in run.ranks:  # 2 PPO steps x 2 mini-batches of 4, 2 micro-batches each
        assert record["counts"] == {"backwards": 8, "optimizer_steps": 4, "synced_backwards": 4}
    assert not any("value_head" in name for name in rank0["final"])
    for name in rank0["final"]:
        assert torch.equal(rank0["final"][name], rank1["final"][name]), name
    assert any(not torch.equal(rank0["final"][n], rank0["initial"][n]) for n in rank0["final"])
    for step0, step1 in zip(rank0["step_stats"], rank1["step_stats"]):
        assert step0["env/group_reward_std"] == pytest.approx(step1["env/group_reward_std"])
        assert step0["env/reward_mean"] == pytest.approx(step1["env/reward_mean"])


def test_ddp_ranks_end_with_identical_weights_that_moved(ddp_run):
    rank0, rank1 = ddp_run.ranks
    assert rank0["world_size"] == rank1["world_size"] == WORLD and rank0["strategy"] == "DDPStrategy"
    assert rank0["ppo_step"] == rank1["ppo_step"] == PPO_STEPS
    # one backward per mini-batch (no micro-batches), each all-reduced: 3 steps x 2 mini-batches of 4
    assert rank0["counts"] == rank1["counts"] == {"backwards": 6, "optimizer_steps": 6, "synced_backwards": 6}
    assert rank0["final"].keys() == rank1["final"].keys() and len(rank0["final"]) > 0
    for name in rank0["final"]:
        # several manual backward passes and optimizer steps per training_step: bit-identical on both ranks
        assert torch.equal(rank0["final"][name], rank1["final"][name]), name
        assert torch.equal(rank0["initial"][name], rank1["initial"][name]), name
        assert not torch.equal(rank0["final"][name], rank0["initial"][name]), f"{name} did not change"


def test_ddp_ranks_see_different_prompts(ddp_run):
    rank0, rank1 = (r["prompt_ids"] for r in ddp_run.ranks)
    assert len(rank0) == len(rank1) == PPO_STEPS * BATCH
    assert len(set(rank0)) == len(rank0) and not set(rank0) & set(rank1)  # DistributedSampler shares them out


def test_ddp_statistics_and_beta_are_global(ddp_run):
    rank0, rank1 = ddp_run.ranks
    # reward and KL means are reduced over both ranks: the same numbers, although each saw other prompts
    assert rank0["logged"] == rank1["logged"] and len(rank0["logged"]) == PPO_STEPS
    assert rank0["logged"][0]["kl"] == 0.0 and rank0["logged"][-1]["kl"] != 0.0
    # the KL controller is fed the global mean KL and the global sample count: the same beta everywhere.
    # With KL far below the target (6), each step's error is clipped at -0.2 and
    # beta <- beta * (1 - 0.2 * n / horizon) with n = 2 ranks x 8 samples = 16 and horizon 32: x0.9 per step.
    assert all(step["kl"] < 0.8 * 6.0 for step in rank0["logged"])
    assert rank0["beta"] == rank1["beta"] != rank0["initial_beta"]
    assert rank0["beta"] == pytest.approx(rank0["initial_beta"] * 0.9**PPO_STEPS)


def test_ddp_loss_is_normalised_over_every_process(ddp_run):
    # each mini-batch's loss divides by the token count of both ranks (test_ppo_loss_gradient_under_ddp_...
    # shows that this makes DDP's averaged gradient the gradient of the global mini-batch)
    rank0, rank1 = (record["loss_processes"] for record in ddp_run.ranks)
    assert len(rank0) == len(rank1) >= PPO_STEPS * 2  # 8 samples per step, mini-batches of 4
    assert set(rank0) == set(rank1) == {float(WORLD)}


def test_reduction_helpers_equal_statistics_of_the_concatenated_data(ddp_run):
    inputs = [r["probe_input"] for r in ddp_run.ranks]  # ranks hold 3 and 5 rows of different values
    x = torch.cat([x for x, _ in inputs])
    mask = torch.cat([m for _, m in inputs])
    # masked_whiten with the module's reduce function == whitening the two ranks' data put together
    expected = objectives.masked_whiten(x, mask)
    got = torch.cat([r["reduced"]["whitened"] for r in ddp_run.ranks])
    assert_close(got, expected)
    # masked_moments_many with the module's reduce function == mean, unbiased std and count of the concatenation
    first_column, masked = x[:, 0], x[mask.bool()]
    expected = torch.tensor([[first_column.mean(), masked.mean()], [first_column.std(), masked.std()],
                             [float(len(first_column)), float(len(masked))]])
    for record in ddp_run.ranks:
        assert_close(record["reduced"]["mean_std_n"], expected)
        assert bool(record["reduced"]["input_unchanged"])  # the strategy reduces in place: helpers pass a copy


def test_every_logged_step_statistic_is_global(ddp_run):
    # the ranks hold different responses, yet every statistic of a step (rewards, KL, returns, values,
    # advantages) must be the same number on both: a statistic of the global batch
    rank0, rank1 = (r["step_stats"] for r in ddp_run.ranks)
    assert len(rank0) == len(rank1) == PPO_STEPS
    for step0, step1 in zip(rank0, rank1):
        assert step0.keys() == step1.keys()
        assert "ppo/returns/mean" in step0 and "ppo/val/var_explained" in step0
        different = {k: (step0[k], step1[k]) for k in step0 if not math.isclose(step0[k], step1[k], rel_tol=1e-5, abs_tol=1e-6)}
        assert not different


def test_ddp_writes_logs_checkpoint_and_adapter_once(ddp_run):
    rank0, rank1 = ddp_run.ranks
    assert not rank0["process_group_alive_after_run"] and not rank1["process_group_alive_after_run"]
    logs = ddp_run.dir / "logs"
    assert rank0["log_dir"] == rank1["log_dir"]
    assert [p.name for p in (logs / "lightning_logs").iterdir()] == ["version_0"]
    run_dir = ddp_run.dir / rank0["log_dir"]
    assert len(list(logs.rglob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(run_dir))
    events.Reload()
    rewards = events.Scalars("env/reward_mean")
    assert [e.step for e in rewards] == [1, 2, 3]
    assert [e.value for e in rewards] == pytest.approx([step["reward"] for step in rank0["logged"]])
    assert len(list(logs.rglob("config.yaml"))) == 1

    # one adapter, written by rank zero, holding the weights both ranks ended with
    assert [p.parent for p in logs.rglob("adapter_config.json")] == [run_dir / "adapter"]
    assert not list(run_dir.glob(".adapter-*")) and not (run_dir / "adapter.old").exists()
    exported = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    value_head = torch.load(run_dir / "adapter" / "value_head.pt")
    expected = {}
    for name, weight in rank0["final"].items():
        if name.startswith("policy.model."):
            # peft saves without the adapter name: ...q.lora_A.default.weight -> ...q.lora_A.weight
            expected[name[len("policy.model."):].replace(".default.", ".")] = weight
    assert expected and expected.keys() <= exported.keys()  # (with lm_head adapted, peft also saves its base weight)
    for name, weight in expected.items():
        assert torch.equal(exported[name], weight), name
    assert torch.equal(value_head["summary.weight"], rank0["final"]["policy.value_head.summary.weight"])

    # one last.ckpt, with rank zero's state: the trained weights, the PPO step and beta
    (last,) = list(logs.rglob("last.ckpt"))
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["lit_rlhf"]["ppo_step"] == PPO_STEPS
    assert checkpoint["lit_rlhf"]["kl_controller"]["value"] == rank0["beta"]
    assert checkpoint["state_dict"].keys() == rank0["final"].keys()
    for name, weight in checkpoint["state_dict"].items():
        assert torch.equal(weight, rank0["final"][name]), name


def test_ddp_resume_from_a_periodic_checkpoint_is_the_uninterrupted_run(ddp_run, tmp_path):
    # each process samples from its own random stream: the checkpoint holds every process's states and each
    # restores its own (rank zero's on both, or a fresh per-rank seed, would sample other responses)
    uninterrupted = ddp_run.dir / ddp_run.ranks[0]["log_dir"]
    checkpoints = tmp_path / "logs" / "lightning_logs" / "version_0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(uninterrupted / "checkpoints" / "ppo_step=2.ckpt", checkpoints)  # PPO step 2 of 3
    resumed = run_worker(tmp_path, "--ckpt_path", str(checkpoints / "ppo_step=2.ckpt"))
    for before, after in zip(ddp_run.ranks, resumed.ranks):
        assert after["ppo_step"] == PPO_STEPS and after["prompt_ids"] == before["prompt_ids"][-BATCH:]
        assert after["step_stats"] == before["step_stats"][-1:]
        assert after["final"].keys() == before["final"].keys()
        for name, weight in after["final"].items():
            assert torch.equal(weight, before["final"][name]), name


def test_restoring_random_states_says_whether_each_process_got_its_own():
    # PPO seeds each process's sampling stream anew only when it did not get its own back
    from lit_rlhf.runtime import checkpoint_rng, restore_checkpoint_rng

    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(checkpoint_rng(None)["rng"])
    two = {"rng": states[0], "rng_by_rank": states}
    assert restore_checkpoint_rng(SimpleNamespace(world_size=2, global_rank=1), two)
    assert not restore_checkpoint_rng(SimpleNamespace(world_size=2, global_rank=1), {"rng": states[0]})
    assert not restore_checkpoint_rng(SimpleNamespace(world_size=4, global_rank=1), two)
    assert restore_checkpoint_rng(None, {"rng": states[0]})
    assert not restore_checkpoint_rng(None, {})


def test_response_length_limits_are_one_draw_over_the_global_batch():
    from lit_rlhf.modules import PPOModule
    from lit_rlhf.settings import GenerationSettings

    def limits(world: int, rank: int) -> torch.Tensor:
        module = PPOModule(generation=GenerationSettings(max_new_tokens=(4, 100)), seed=3, rollout_batch_size=8,
                           export_adapter=False)
        module.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        return module.response_length_limits(8)

    # a single process draws what Policy.generate draws from the same generator
    assert torch.equal(limits(1, 0), torch.randint(4, 100, (8,), generator=torch.Generator().manual_seed(3)))
    # two ranks take the two halves of one draw of 16: different limits, generators in step
    together = torch.randint(4, 100, (16,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.cat([limits(2, 0), limits(2, 1)]), together)


# ------------------------------------------------------------------ the PPO loss on 2 processes (no fit)


def pad_and_concatenate(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The processes' mini-batches as one: rows concatenated, each padded (mask 0) to the widest."""
    width = max(b["response_mask"].shape[1] for b in batches)

    def pad(t: torch.Tensor) -> torch.Tensor:
        extra = width - t.shape[1]
        return torch.nn.functional.pad(t, (0, 0, 0, extra) if t.dim() == 3 else (0, extra))

    return {k: torch.cat([pad(b[k]) for b in batches]) for k in batches[0]}


def test_ppo_loss_gradient_under_ddp_equals_the_gradient_of_the_concatenated_minibatch(tmp_path):
    # 2 gloo processes hold 2 rows (8 tokens) and 3 rows (7 tokens) of different widths; DDP averages their
    # gradients. With the loss's denominators reduced over processes, that average is the gradient one process
    # gets from the 5 rows together, whatever the aggregation. Covers the surrogate, the KL term and the value loss.
    import ddp_loss_worker as worker

    modes = list(objectives.LOSS_AGGREGATIONS)
    torch.multiprocessing.spawn(worker.run, args=(str(tmp_path / "init"), str(tmp_path), modes),
                                nprocs=worker.WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(worker.WORLD)]
    per_process = [worker.minibatch(r) for r in range(worker.WORLD)]
    for mode in modes:
        expected = gradients(worker, [pad_and_concatenate(per_process)], mode)
        for name, grad in expected.items():
            assert torch.equal(ranks[0][mode][name], ranks[1][mode][name]), name  # DDP: the same on both ranks
            assert_close(ranks[0][mode][name], grad, msg=lambda m: f"{mode}, {name}: {m}")
        # what each process normalising by its own counts gives, averaged as DDP does: another gradient
        local = gradients(worker, per_process, mode)
        assert all((local[name] - grad).abs().max() > 1e-3 for name, grad in expected.items()), mode


def gradients(worker, batches: list[dict[str, torch.Tensor]], mode: str) -> dict[str, torch.Tensor]:
    """The mean over ``batches`` of the gradient of each one's loss, each normalised on its own."""
    model = worker.TinyPolicy()
    for batch in batches:
        (worker.objective(model, batch, mode, lambda t: t) / len(batches)).backward()
    return {name: param.grad for name, param in model.named_parameters()}


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

        # each block the model declares (_no_split_modules) is its own FSDP unit (tests/test_memory.py)
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
