"""SFTModule: the loss is the summary tokens' NLL, a short fit learns, exports load into PPO, bad input fails."""

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from torch.testing import assert_close
from transformers import T5ForConditionalGeneration

from conftest import assert_resume_is_exact, dialogue_rows, fake_sharding, perturb_lora, write_jsonl
from lit_rlhf.cli import run_sft
from lit_rlhf.data import DialogSumDataModule
from lit_rlhf.modules import PPOModule
from lit_rlhf.models import Policy
from lit_rlhf.settings import GenerationSettings
from lit_rlhf.rewards import ProfanityReward
from lit_rlhf.modules import SFTModule, lead_summary, longest_summary, lr_factor, rouge_scores
from lit_rlhf.models import build_tiny_t5

SFT_CONFIGS = sorted(Path(__file__).parents[2].joinpath("configs").glob("sft_*.yaml"))


class MetricsRecorder(L.Callback):
    def __init__(self):
        self.train: list[float] = []
        self.val: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train.append(float(outputs["loss"]))

    def on_validation_end(self, trainer, pl_module):  # after the module has logged its epoch's ROUGE
        self.val.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})


def supervised_data(model_name: str, batch_size: int = 16) -> DialogSumDataModule:
    # short dialogues and summaries keep each step fast; 2% of the kept rows are held out
    return DialogSumDataModule(model_name=model_name, with_labels=True, min_chars=200, max_chars=500,
                               test_size=0.02, max_prompt_tokens=128, max_summary_tokens=32,
                               batch_size=batch_size, eval_batch_size=16)


def batch_of(model_name: str, n: int = 4) -> dict:
    data = supervised_data(model_name, batch_size=n)
    data.setup("fit")
    return next(iter(data.val_dataloader()))


@pytest.fixture(scope="module")
def full_sft(tmp_path_factory):
    """A full-weight SFT fit on the tiny T5 (validated before and after), exported to a folder."""
    tmp = tmp_path_factory.mktemp("full_sft")
    torch.manual_seed(0)
    module = SFTModule("embedded:tiny-t5", finetune="full", learning_rate=3e-3, warmup_steps=5,
                       lr_schedule="cosine", max_new_tokens=24, export_dir=str(tmp / "model"))
    recorder = MetricsRecorder()
    trainer = L.Trainer(default_root_dir=tmp, max_steps=80, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2,
                        num_sanity_val_steps=0, val_check_interval=80, callbacks=[recorder])
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
    trainer.fit(ppo, DialogSumDataModule(model_name=ppo.hparams.model_name, batch_size=8, eval_batch_size=8))
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
    # attention names, gated-GELU, untied lm_head) and the hub dataset by the bundled copy
    stand_in = build_tiny_t5(str(tmp_path / "flan-t5-stand-in"))
    cli = run_sft([
        "fit", "--config", str(SFT_CONFIGS[0].parent / "sft_flan_t5.yaml"), "--model.model_name", stand_in,
        "--data.dataset", "bundled", "--data.batch_size", "4", "--data.max_chars", "500",
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
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model_name"] == yaml.safe_load(config.read_text())["model"]["model_name"]
    # any prompt data module can be chosen, so its settings print under class_path/init_args
    assert printed["data"]["class_path"] == "lit_rlhf.data.DialogSumDataModule"
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


def test_predict_writes_one_summary_per_dialogue(tmp_path):
    dialogues = [
        {"id": "a", "dialogue": "#Person1#: Hi, how are you?\n#Person2#: Fine. I am going to the bank."},
        {"id": "b", "dialogue": "#Person1#: When is the meeting?\n#Person2#: At three, in room five."},
        {"dialogue": "#Person1#: A ticket to Paris, please.\n#Person2#: One way or return?"},
    ]
    source = tmp_path / "three.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in dialogues))
    cli = run_sft(["predict", "--model.model_name", "embedded:tiny-t5", "--model.max_new_tokens", "6",
                   "--data.predict_path", str(source), "--trainer.default_root_dir", str(tmp_path / "logs"),
                   "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"])
    written = Path(cli.trainer.log_dir) / "predictions.jsonl"
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "2"]  # the row without an id gets its row number
    assert [r["dialogue"] for r in rows] == [d["dialogue"] for d in dialogues]
    assert all(isinstance(r["summary"], str) and r["summary"] for r in rows)
    assert not list(written.parent.glob(".predictions.jsonl.*"))  # no temporary file left behind


def test_predict_inputs_fail_with_one_line_errors(tmp_path):
    from lit_rlhf.data import load_predict_rows

    (tmp_path / "text.csv").write_text("id,text\n1,hello\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.parquet").write_bytes(b"not a parquet file")
    (tmp_path / "notes.txt").write_text("x")
    cases = {
        "text.csv": "has no 'dialogue' column",
        "empty.jsonl": "is empty",
        "broken.parquet": "could not be read",
        "notes.txt": "expected a",
        "missing.jsonl": "does not exist",
    }
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message) as info:
            load_predict_rows(str(tmp_path / name))
        assert "\n" not in str(info.value) and name in str(info.value)
    with pytest.raises(ValueError, match="--data.predict_path"):
        load_predict_rows(None)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "part1.csv").write_text('dialogue\n"#Person1#: Hi."\n')
    (folder / "part2.csv").write_text('dialogue\n"#Person1#: Bye."\n')
    rows = load_predict_rows(str(folder))
    assert rows["id"] == ["0", "1"] and rows["dialogue"] == ["#Person1#: Hi.", "#Person1#: Bye."]


def test_interrupted_run_resumes_from_last_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def trainer(max_steps):
        return L.Trainer(default_root_dir=tmp_path, max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0,
                         callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)])

    first = SFTModule("embedded:tiny-t5", finetune="full", learning_rate=1e-2, export_dir=str(tmp_path / "m"))
    trainer(2).fit(first, supervised_data("embedded:tiny-t5", batch_size=4))
    saved = {k: v.clone() for k, v in first.state_dict().items()}
    second = SFTModule("embedded:tiny-t5", finetune="full", learning_rate=1e-2, export_dir=str(tmp_path / "m"))
    seen = []

    class FirstWeights(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append({k: v.clone() for k, v in pl_module.state_dict().items()})

    resumed = trainer(4)
    resumed.callbacks.append(FirstWeights())
    resumed.fit(second, supervised_data("embedded:tiny-t5", batch_size=4), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    for key, value in saved.items():  # training went on from the saved weights (and optimizer), not from scratch
        assert torch.equal(seen[0][key], value), key
    assert resumed.global_step == 4
    assert resumed.lr_scheduler_configs[0].scheduler.last_epoch == 4


def test_embedded_summarizer_name_resolves_to_the_package_folder():
    from lit_rlhf.models import resolve_model_path

    folder = Path(__file__).parents[2] / "lit_rlhf" / "assets" / "summarizer"
    if (folder / "model.safetensors").exists():
        assert Path(resolve_model_path("embedded:summarizer")) == folder
    else:
        with pytest.raises(FileNotFoundError, match="lit-rlhf-sft fit --config configs/sft_embedded.yaml"):
            resolve_model_path("embedded:summarizer")
    with pytest.raises(ValueError, match="embedded:summarizer"):
        resolve_model_path("embedded:nope")


def test_untrained_summarizer_has_the_documented_shape_and_fits_25_mb():
    from lit_rlhf.models import SUMMARIZER_ARCHITECTURE, resolve_model_path

    folder = Path(resolve_model_path("embedded:summarizer-untrained"))
    config = json.loads((folder / "config.json").read_text())
    for key in ("vocab_size", "d_model", "d_ff", "num_layers", "num_heads", "d_kv"):
        assert config[key] == SUMMARIZER_ARCHITECTURE[key], key
    assert config["num_decoder_layers"] == SUMMARIZER_ARCHITECTURE["num_layers"]
    assert config["tie_word_embeddings"] is SUMMARIZER_ARCHITECTURE["tie_embeddings"] is True
    model = T5ForConditionalGeneration.from_pretrained(folder)
    assert model.lm_head.weight is model.shared.weight  # tied: one matrix, stored once
    assert (folder / "model.safetensors").stat().st_size <= 25 * 10**6


def test_a_fully_trained_policy_has_no_adapter_reference():
    policy = Policy("embedded:tiny-t5", finetune="full", value_head=False)
    ids = torch.tensor([[5, 6, 1]])
    with pytest.raises(ValueError, match="reference_model"):
        policy.reference_forward(ids, torch.ones_like(ids), ids, torch.ones_like(ids))


def test_lit_rlhf_sft_user_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from lit_rlhf.cli import main_sft

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lit-rlhf-sft", "fit", "--model.learning_rate", "-1"])
    monkeypatch.delenv("LIT_RLHF_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main_sft()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lit-rlhf-sft: error:") and "learning_rate" in err[0], err


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


def test_the_shipped_summarizer_reads_the_dialogue():
    """The packaged summarizer (lit_rlhf/assets/summarizer, PROVENANCE.md) is a model that summarizes: its
    reference-summary loss is clearly worse with another row's dialogue, and its greedy summaries differ by
    dialogue and name the speakers as DialogSum's references do."""
    from lit_rlhf.models import resolve_model_path

    folder = Path(__file__).parents[2] / "lit_rlhf" / "assets" / "summarizer"
    assert Path(resolve_model_path("embedded:summarizer")) == folder
    assert (folder / "model.safetensors").stat().st_size <= 25 * 10**6
    assert (folder / "PROVENANCE.md").exists()
    module = SFTModule("embedded:summarizer", finetune="full", max_new_tokens=40, no_repeat_ngram_size=3).eval()
    batch = batch_of("embedded:summarizer", n=16)
    with torch.no_grad():
        gap = module.prompt_gap(batch).item()
        summaries = module.generate_summaries(batch)
    assert gap > 0.5, gap  # nats per token; about 0 for a model that ignores the dialogue
    assert len(set(summaries)) >= 14, summaries
    assert sum("#Person" in s for s in summaries) >= 12, summaries


# ------------------------------------------------------------------ several processes


def test_sft_training_loss_divides_by_every_process_token_count():
    # Under DDP the gradients are averaged over processes: each process's loss must be its share of the global
    # token mean (local sum x P / global count), not its own mean. Another process is faked holding 7 tokens.
    torch.manual_seed(0)
    module = SFTModule("embedded:tiny-t5").eval()
    batch = batch_of("embedded:tiny-t5")
    other_tokens = 7.0
    module.trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(
        reduce=lambda t, reduce_op: t + torch.tensor([other_tokens, 1.0], dtype=t.dtype)))  # [tokens, processes]
    module.log = lambda *args, **kwargs: None
    module.optimizers = lambda: SimpleNamespace(param_groups=[{"lr": 1e-3}])
    with torch.no_grad():
        loss = module.training_step(batch, 0)
        local_mean = module.sft_loss(batch)
    n = batch["summary_mask"].sum().float()
    assert_close(loss, local_mean * n * 2 / (n + other_tokens))


def hf_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The seq2seq model's teacher-forced logits on the batch's summaries: [B, S, V]."""
    labels = batch["summary_ids"].masked_fill(batch["summary_mask"] == 0, -100)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits


@pytest.mark.parametrize("sharding, finetune", [("deepspeed_zero3", "lora"), ("fsdp", "full")])
def test_sft_export_writes_the_gathered_weights_when_they_are_sharded(sharding, finetune, tmp_path, monkeypatch):
    # Under ZeRO-3 or FSDP a process holds a shard of each weight; the export must gather them
    # (``distributed.full_weights``, PPO's export path too). Faked: the live weights are zeros except inside
    # the strategy's gathering, which puts the trained weights back.
    from peft import PeftModel

    from lit_rlhf.models import load_causal_or_seq2seq
    from lit_rlhf.models import resolve_model_path

    torch.manual_seed(0)
    module = SFTModule("embedded:tiny-t5", finetune=finetune, export_dir=str(tmp_path / "export")).eval()
    if finetune == "lora":
        perturb_lora(module.policy.model)  # an adapter that changes the outputs
    batch = batch_of("embedded:tiny-t5")
    expected = hf_logits(module.policy.model, batch)
    trained = [p for p in module.parameters() if p.requires_grad]
    strategy = fake_sharding(sharding, module, trained, monkeypatch)
    module.trainer = SimpleNamespace(world_size=2, is_global_zero=True, strategy=strategy)
    module.on_fit_end()

    export = tmp_path / "export"
    base = load_causal_or_seq2seq(resolve_model_path("embedded:tiny-t5"))
    loaded = PeftModel.from_pretrained(base, export) if finetune == "lora" else load_causal_or_seq2seq(str(export))
    assert_close(hf_logits(loaded.eval(), batch), expected)


def test_rows_longer_than_the_context_are_cut_to_fit_it_not_an_index_error(tmp_path, short_context_gpt2,
                                                                            datasets_cache):
    # GPT-2 reads at most n_positions=32 tokens: prompt + completion must fit, the prompt giving way in its content
    from lit_rlhf.data import PromptDataModule

    rows = [{"text": " ".join(f"w{k}" for k in range(5 * i + 5)), "answer": "a short answer"} for i in range(8)]
    rows.append({"text": "short", "answer": " ".join(["long"] * 40)})  # the completion alone fills the context
    source = write_jsonl(tmp_path / "sft.jsonl", rows)
    data = PromptDataModule(model_name=str(short_context_gpt2), dataset=str(source), template="{text}\nAnswer:",
                            completion_column="answer", with_labels=True, test_size=0.25, batch_size=2,
                            eval_batch_size=8)
    data.prepare_data()
    data.setup("fit")
    module = SFTModule(str(short_context_gpt2), finetune="full")
    with torch.no_grad():  # every row, as one batch
        assert torch.isfinite(module.sft_loss(data.collator(list(data.train_set) + list(data.test_set))))
    assert data.max_context_tokens == 32
    fitted = list(data.train_set) + list(data.test_set)
    assert all(len(r["input_ids"]) + len(r["summary_ids"]) <= 32 for r in fitted)
    assert all(r["query"].endswith("\nAnswer:") for r in fitted)
    assert data.summary()["prompts_cut"] > 0 and data.summary()["prompts_dropped"] == 1


@pytest.mark.parametrize("group_by_length", [False, True])
def test_a_resumed_sft_fit_ends_with_the_weights_of_an_uninterrupted_one(group_by_length, tmp_path, monkeypatch,
                                                                         datasets_cache):
    """12 training pairs in batches of 4: 3 steps an epoch. 8 steps straight, and resumed from step 4 (the
    second batch of the second epoch, each epoch a new order): the adapter is the same, bit for bit."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(Path("dialogues.jsonl"), dialogue_rows(15))
    assert_resume_is_exact(run_sft, [
        "--model.model_name", "embedded:tiny-t5", "--data.dataset", "dialogues.jsonl", "--data.test_size", "0.2",
        "--data.min_chars", "0", "--data.batch_size", "4", "--data.group_by_length", str(group_by_length).lower(),
        "--model.learning_rate", "1e-2", "--model.lr_schedule", "constant", "--model.lora.dropout", "0.2",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.limit_val_batches", "0", "--seed_everything", "3"], "adapter/adapter_model.safetensors")


def test_each_sft_epoch_is_a_new_order_of_every_training_pair(datasets_cache, tmp_path):
    """The supervised loader is the seeded stream: epoch after epoch of full batches, a new permutation each, and
    a loader made at position k (a resumed run) goes on with the stream's batch k."""
    write_jsonl(tmp_path / "d.jsonl", dialogue_rows(15))
    data = DialogSumDataModule(model_name="embedded:tiny-t5", dataset=str(tmp_path / "d.jsonl"), with_labels=True,
                               test_size=0.2, min_chars=0, batch_size=4)
    data.setup("fit")
    ids = data.train_set["id"]
    epochs = []
    for _ in range(2):
        loader = data.train_dataloader()
        assert len(loader) == 3
        epochs.append([b["id"] for b in loader])
        data.consumed_batches += len(loader)
    assert [sorted(sum(e, [])) for e in epochs] == [sorted(ids)] * 2 and epochs[0] != epochs[1]
    data.consumed_batches = 4  # resumed after the second epoch's first batch: its other two, and a full length
    loader = data.train_dataloader()
    assert [b["id"] for b in loader] == epochs[1][1:] and len(loader) == 3
    # two processes: each takes 2 rows of every global batch of 4, none twice (no sampler swapped in by DDP)
    data.consumed_batches, data.batch_size = 0, 2
    shares = []
    for rank in (0, 1):
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = data.train_dataloader()
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler) and len(loader) == 3
        shares.append([i for b in loader for i in b["id"]])
    assert set(shares[0]).isdisjoint(shares[1]) and sorted(shares[0] + shares[1]) == sorted(ids)


def test_length_grouped_stream_gives_each_process_rows_of_similar_length():
    """group_by_length under two processes: each global batch of 2 x 3 rows is a run of neighbouring lengths
    (one chunk here), the processes' slices are disjoint and cover every full batch, and a new epoch reorders."""
    from lit_rlhf.data import PromptStreamSampler

    lengths = [(7 * i) % 20 for i in range(20)]  # every length 0..19 once
    position = {"k": 0}

    def shares() -> list[list[int]]:
        return [list(PromptStreamSampler(20, 3, 2, rank, seed=1, shuffle=True, position_fn=lambda: position["k"],
                                         lengths=lengths)) for rank in (0, 1)]

    first = shares()
    assert set(first[0]).isdisjoint(first[1]) and len(first[0] + first[1]) == 18  # 3 full global batches
    used = sorted(lengths[i] for i in first[0] + first[1])
    batches = [sorted(lengths[i] for i in first[0][3 * k : 3 * k + 3] + first[1][3 * k : 3 * k + 3])
               for k in range(3)]  # global batch k: rank 0's 3 rows and rank 1's
    assert sorted(batches) == [used[:6], used[6:12], used[12:]]  # the shortest 6, the next 6, the longest 6
    position["k"] = 3  # the second epoch
    assert shares() != first


def test_each_process_resumes_its_own_random_numbers():
    """Under DDP each process draws dropout masks for its own batch, so their RNG states differ: a checkpoint of
    two processes restores rank 1's states on rank 1; one of another number of processes, rank zero's."""
    from lit_rlhf.runtime import checkpoint_rng, restore_checkpoint_rng

    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(checkpoint_rng(None)["rng"])
    expected = torch.rand(3, generator=torch.Generator().manual_seed(2))  # what rank 1 draws next
    state = {"rng": states[0], "rng_by_rank": states}
    restore_checkpoint_rng(SimpleNamespace(world_size=2, global_rank=1), state)
    assert torch.equal(torch.rand(3), expected)
    restore_checkpoint_rng(SimpleNamespace(world_size=4, global_rank=1), state)
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(1)))
