"""SFTModule: the loss is the summary tokens' NLL, a short fit learns, exports load into PPO, bad settings fail.
Predicting, resuming and several processes: test_sft_runs.py."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.testing import assert_close

from sft_data import batch_of, supervised_data

from lit_rlhf.cli import run_sft
from lit_rlhf.data import DialogSumDataModule
from lit_rlhf.models import Policy, resolve_model_path
from lit_rlhf.modules import PPOModule, SFTModule, lead_summary, longest_summary, lr_factor, rouge_scores
from lit_rlhf.rewards import ProfanityReward
from lit_rlhf.settings import GenerationSettings

SFT_CONFIGS = sorted(Path(__file__).parents[2].joinpath("configs").glob("sft_*.yaml"))


class MetricsRecorder(L.Callback):
    def __init__(self):
        self.train: list[float] = []
        self.val: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train.append(float(outputs["loss"]))

    def on_validation_end(self, trainer, pl_module):  # after the module has logged its epoch's ROUGE
        self.val.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})


@pytest.fixture(scope="module")
def full_sft(tmp_path_factory):
    """A full-weight SFT fit on the tiny T5 (validated before and after), exported to a folder."""
    tmp = tmp_path_factory.mktemp("full_sft")
    torch.manual_seed(0)
    module = SFTModule("embedded:tiny-t5", finetune="full", learning_rate=3e-3, warmup_steps=5,
                       lr_schedule="cosine", max_new_tokens=24, export_dir=str(tmp / "model"))
    recorder = MetricsRecorder()
    # 50 steps: over seeds 0, 1, 2 the losses fall by 2.4 and ROUGE-1 rises by 0.14 (test_full_fit_loss_falls...)
    trainer = L.Trainer(default_root_dir=tmp, max_steps=50, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2,
                        num_sanity_val_steps=0, val_check_interval=50, callbacks=[recorder])
    data = supervised_data("embedded:tiny-t5")
    trainer.validate(module, data)
    trainer.fit(module, data)
    return module, recorder, tmp / "model"


def test_lr_factor_warmup_then_cosine_to_floor():
    # warmup 4 steps: (s + 1) / 4; then cosine from 1 to min_ratio over steps 4..14
    f = lambda s: lr_factor(s, warmup_steps=4, decay_steps=14, schedule="cosine", min_ratio=0.1)  # noqa: E731
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi / 2) = 0
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert lr_factor(9, 4, 14, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(50, 4, 14, "constant", 0.0) == 1.0


def test_full_fit_loss_falls_and_rouge_rises(full_sft):
    module, recorder, _ = full_sft
    before, after = recorder.val[0], recorder.val[-1]
    first, last = sum(recorder.train[:5]) / 5, sum(recorder.train[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert after["val/loss"] < before["val/loss"] - 1.0
    assert after["val/rouge1"] > before["val/rouge1"] + 0.05, (before, after)


def test_full_export_loads_as_ppo_init_adapter_with_zero_kl(full_sft, tmp_path):
    module, _, export = full_sft
    assert (export / "model.safetensors").exists() and not (export / "adapter_config.json").exists()
    batch = batch_of("embedded:tiny-t5")
    args = (batch["input_ids"], batch["attention_mask"], batch["summary_ids"], batch["summary_mask"])
    module.policy.eval()
    with torch.no_grad():
        sft_logprobs = module.policy(*args, with_values=False).logprobs
    ppo = PPOModule(model_name="embedded:tiny-t5", init_adapter=str(export), reward=ProfanityReward(),
                    generation=GenerationSettings(min_new_tokens=1, max_new_tokens=(4, 8)), ppo_steps=1,
                    rollout_batch_size=8, mini_batch_size=4, log_samples_every=0, export_adapter=False,
                    fast_rollout=False)  # exact mode: the step-1 KL is exactly 0
    # the PPO reference (adapter disabled) is the SFT model itself, not the random base
    ppo.policy.eval()
    assert_close(ppo.policy.reference_forward(*args).logprobs, sft_logprobs, atol=1e-5, rtol=0)
    kl = fit_ppo_one_step(ppo, tmp_path)
    assert kl == 0.0


def fit_ppo_one_step(ppo: PPOModule, tmp_path: Path) -> float:
    """Fit PPO for one step; return the step's logged KL."""
    seen = []

    class KL(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(trainer.callback_metrics["kl"]))

    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[KL()])
    # the bundled test split: 1,500 dialogues to filter and encode, not 12,460
    trainer.fit(ppo, DialogSumDataModule(model_name=ppo.hparams.model_name, batch_size=8, eval_batch_size=8,
                                         split="test"))
    return seen[0]


def test_decoder_only_loss_is_the_summary_tokens_nll():
    # Against a manual computation: each row unpadded as [prompt, summary] through the plain HF model with
    # labels -100 on the prompt, so HF's own shifted cross-entropy scores the summary tokens only.
    torch.manual_seed(0)
    module = SFTModule("embedded:tiny-gpt2", finetune="full").eval()
    batch = batch_of("embedded:tiny-gpt2")
    assert batch["attention_mask"][:, 0].min() == 0  # rows of different lengths: left padding is exercised
    with torch.no_grad():
        loss = module.sft_loss(batch)
        total, count = 0.0, 0
        for q, qm, s, sm in zip(batch["input_ids"], batch["attention_mask"], batch["summary_ids"],
                                batch["summary_mask"]):
            prompt, summary = q[qm.bool()], s[sm.bool()]
            ids = torch.cat([prompt, summary])[None]
            labels = torch.cat([torch.full_like(prompt, -100), summary])[None]
            row_loss = module.policy.model(input_ids=ids, labels=labels).loss
            total, count = total + float(row_loss) * len(summary), count + len(summary)
    assert_close(loss, torch.tensor(total / count), atol=1e-5, rtol=0)
    # the loss reads the summary mask: padding after the summary never counts
    padded = dict(batch, summary_ids=torch.nn.functional.pad(batch["summary_ids"], (0, 3), value=7),
                  summary_mask=torch.nn.functional.pad(batch["summary_mask"], (0, 3)))
    with torch.no_grad():
        assert_close(module.sft_loss(padded), loss, atol=1e-5, rtol=0)


def test_flan_t5_recipe_config_makes_an_adapter_that_ppo_loads(tmp_path):
    # configs/sft_flan_t5.yaml with google/flan-t5-base replaced by a tiny T5 of the same family (q/v
    # attention names, gated-GELU, untied lm_head: the embedded one's folder) and the hub dataset by the bundled
    # copy's test split (1,500 dialogues to encode, not 12,460)
    stand_in = resolve_model_path("embedded:tiny-t5")
    cli = run_sft([
        "fit", "--config", str(SFT_CONFIGS[0].parent / "sft_flan_t5.yaml"), "--model.model_name", stand_in,
        "--data.dataset", "bundled", "--data.split", "test", "--data.batch_size", "4", "--data.max_chars", "500",
        "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "logs"),
        "--model.max_new_tokens", "8", "--model.lr_schedule", "constant",
    ])
    adapter = Path(cli.trainer.log_dir) / "adapter"
    settings = json.loads((adapter / "adapter_config.json").read_text())
    assert settings["r"] == 32 and settings["lora_alpha"] == 32 and settings["lora_dropout"] == 0.05
    assert sorted(settings["target_modules"]) == ["q", "v"]
    assert (adapter / "tokenizer.json").exists()
    assert next(Path(cli.trainer.log_dir).rglob("last.ckpt")).exists()

    batch = batch_of(stand_in)
    args = (batch["input_ids"], batch["attention_mask"], batch["summary_ids"], batch["summary_mask"])
    sft_policy = cli.model.policy.eval()
    with torch.no_grad():
        sft_logprobs = sft_policy(*args, with_values=False).logprobs
        base_logprobs = sft_policy.reference_forward(*args).logprobs
    assert (sft_logprobs - base_logprobs).abs().max() > 1e-4  # three steps moved the adapter off zero
    ppo = PPOModule(model_name=stand_in, init_adapter=str(adapter), reward=ProfanityReward(),
                    generation=GenerationSettings(min_new_tokens=1, max_new_tokens=(4, 8)), ppo_steps=1,
                    rollout_batch_size=8, mini_batch_size=4, log_samples_every=0, export_adapter=False,
                    fast_rollout=False)  # exact mode: the step-1 KL is exactly 0
    ppo.policy.eval()
    assert_close(ppo.policy.reference_forward(*args).logprobs, sft_logprobs, atol=1e-5, rtol=0)
    assert fit_ppo_one_step(ppo, tmp_path) == 0.0


@pytest.mark.parametrize("config", SFT_CONFIGS, ids=lambda p: p.name)
def test_sft_configs_parse(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_sft(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed, source = yaml.safe_load(capsys.readouterr().out), yaml.safe_load(config.read_text())
    assert printed["model"]["model_name"] == source["model"]["model_name"]
    # any prompt data module can be chosen, so its settings print under class_path/init_args
    assert printed["data"]["class_path"] == source["data"].get("class_path", "lit_rlhf.data.DialogSumDataModule")
    assert printed["data"]["init_args"]["with_labels"] is True


def test_bad_settings_and_inputs_fail_clearly():
    with pytest.raises(ValueError, match="model.learning_rate"):
        SFTModule(learning_rate=0.0)
    with pytest.raises(ValueError, match="model.decay_steps"):
        SFTModule(warmup_steps=10, decay_steps=5)
    with pytest.raises(ValueError, match="model.init_from_scratch=true .* model.finetune=full"):
        SFTModule(init_from_scratch=True, finetune="lora")
    with pytest.raises(ValueError, match="max_summary_tokens"):
        DialogSumDataModule(with_labels=True, max_summary_tokens=1)
    module = SFTModule("embedded:tiny-t5", finetune="full")
    batch = batch_of("embedded:tiny-t5")
    prompts_only = {k: v for k, v in batch.items() if not k.startswith("summary_")}
    with pytest.raises(ValueError, match="data.with_labels=true"):
        module.sft_loss(prompts_only)
    with pytest.raises(ValueError, match="value_head=False"):
        module.policy(batch["input_ids"], batch["attention_mask"], batch["summary_ids"], batch["summary_mask"])


def test_lora_settings_may_be_a_dict():
    # as PPOModule and RewardModelModule take it (a Python caller's dict, a checkpoint's hyperparameters)
    module = SFTModule("embedded:tiny-t5", lora={"r": 4, "target_modules": ["q"]})
    assert module.policy.model.peft_config["default"].r == 4 and module.hparams.lora["r"] == 4
    assert all(".q." in name for name, p in module.policy.named_parameters() if p.requires_grad)
    # checked in the constructor, naming the flag, as in every module (peft failed on it later)
    with pytest.raises(ValueError, match=r"model\.lora\.r and model\.lora\.alpha must be > 0"):
        SFTModule("embedded:tiny-t5", lora={"r": 0})


def test_init_from_scratch_reinitialises_and_trains_every_weight():
    loaded = Policy("embedded:tiny-t5", finetune="full", value_head=False)
    torch.manual_seed(1)
    scratch = Policy("embedded:tiny-t5", finetune="full", value_head=False, init_from_scratch=True)
    assert all(p.requires_grad for p in scratch.parameters())
    assert not torch.equal(loaded.model.shared.weight, scratch.model.shared.weight)
    lora = Policy("embedded:tiny-t5")
    assert lora.parameter_counts()["trainable model parameters"] < loaded.parameter_counts()["all model parameters"]


def test_baselines_by_hand():
    dialogue = "#Person1#: Hi.\n#Person2#: Hello there, friend.\n#Person1#: A much longer line than the rest.\n#Person2#: Ok"
    assert lead_summary(dialogue, 2) == "#Person1#: Hi. #Person2#: Hello there, friend."
    # the three longest, in dialogue order
    assert longest_summary(dialogue, 3) == (
        "#Person1#: Hi. #Person2#: Hello there, friend. #Person1#: A much longer line than the rest."
    )
    # "the cat sat" vs "the cat ran": 2 of 3 unigrams match, 1 of 2 bigrams
    scores = rouge_scores(["the cat sat"], ["the cat ran"])
    assert scores["rouge1"] == pytest.approx(2 / 3) and scores["rouge2"] == pytest.approx(0.5)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_adafactor_steps_are_relative_to_each_weights_scale(optimizer):
    """T5 starts its attention queries ~4x (tiny T5) smaller than its keys: Adafactor moves each by the same
    fraction of its size, AdamW by the same absolute amount (so queries move ~4x more, relatively)."""
    torch.manual_seed(0)
    module = SFTModule("embedded:tiny-t5", finetune="full", optimizer=optimizer, learning_rate=1e-2,
                       warmup_steps=4, lr_schedule="cosine", decay_steps=100)
    config = module.configure_optimizers()
    opt, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * lr_factor(0, 4, 100, "cosine", 0.0))
    attention = module.policy.model.decoder.block[0].layer[1].EncDecAttention
    before = {name: getattr(attention, name).weight.detach().clone() for name in ("q", "k")}
    scheduler.step()  # the schedule scales the optimizer's learning rate, Adafactor's included
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * lr_factor(1, 4, 100, "cosine", 0.0))
    module.sft_loss(batch_of("embedded:tiny-t5")).backward()
    opt.step()
    relative = {name: ((getattr(attention, name).weight - w).norm() / w.norm()).item() for name, w in before.items()}
    if optimizer == "adafactor":
        assert type(opt).__name__ == "Adafactor"
        assert 0.5 < relative["q"] / relative["k"] < 2.0, relative
    else:
        assert relative["q"] / relative["k"] > 2.5, relative


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="model.optimizer must be adamw or adafactor"):
        SFTModule(optimizer="sgd")


def test_prompt_gap_is_zero_exactly_when_the_decoder_cannot_see_the_prompt(full_sft):
    module = SFTModule("embedded:tiny-t5", finetune="full").eval()
    batch = batch_of("embedded:tiny-t5", n=4)
    with torch.no_grad():
        assert module.prompt_gap(batch).abs() > 1e-4  # a random model's output depends on its input
        for block in module.policy.model.decoder.block:  # cut every cross-attention: the prompt is unseen
            block.layer[1].EncDecAttention.o.weight.zero_()
        assert module.prompt_gap(batch) == 0
        one_row = {k: v[:1] for k, v in batch.items() if k != "columns"}  # "columns": a dict of the source's
        assert module.prompt_gap(one_row).isnan()
    _, recorder, _ = full_sft
    assert "val/prompt_gap" in recorder.val[-1]  # validation logs it beside the loss
