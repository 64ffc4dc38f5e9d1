"""DPO: the losses by hand, log 2 at the start, a short fit raises the margin, the adapter loads with plain peft."""

import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.testing import assert_close

from conftest import assert_resume_is_exact, perturb_lora, write_jsonl
from lit_rlhf.models import Policy
from lit_rlhf.modules import DPOModule

PROMPTS = ["Summarize: the cat sat on the mat.", "Summarize: a dog ran in the park today.",
           "Summarize: we met at noon.", "Summarize: rain fell all night long."]
CHOSEN = "good summary"
REJECTED = "terrible awful text here"


def pad(rows: list[list[int]], pad_token_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists padded on ``side`` into ids and mask, LongTensor [B, L] (as the prompt modules pad)."""
    width = max(len(row) for row in rows)
    fill = [width - len(row) for row in rows]
    ids = [[pad_token_id] * f + row if side == "left" else row + [pad_token_id] * f for row, f in zip(rows, fill)]
    mask = [[0] * f + [1] * len(row) if side == "left" else [1] * len(row) + [0] * f for row, f in zip(rows, fill)]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def contract_batch(policy: Policy, prompts: list[str], chosen: list[str], rejected: list[str]) -> dict:
    """A preference batch as the contract describes it, built with the policy's tokenizer."""
    tok = policy.tokenizer
    side = policy.lm.query_padding_side  # right for seq2seq, left for decoder-only

    def response(text: str) -> list[int]:  # no prompt, no decoder start; eos last
        return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    prompt_ids, prompt_mask = pad([tok(p)["input_ids"] for p in prompts], tok.pad_token_id, side)
    chosen_ids, chosen_mask = pad([response(t) for t in chosen], tok.pad_token_id, "right")
    rejected_ids, rejected_mask = pad([response(t) for t in rejected], tok.pad_token_id, "right")
    return {"prompt_input_ids": prompt_ids, "prompt_attention_mask": prompt_mask,
            "chosen_ids": chosen_ids, "chosen_mask": chosen_mask,
            "rejected_ids": rejected_ids, "rejected_mask": rejected_mask,
            "prompt": prompts, "chosen": chosen, "rejected": rejected, "id": [str(i) for i in range(len(prompts))]}


def fixed_pairs(policy: Policy) -> dict:
    n = len(PROMPTS)
    return contract_batch(policy, PROMPTS, [CHOSEN] * n, [REJECTED] * n)


def test_the_module_reads_the_batch_margin():
    # at step zero h = 0, so a pair's loss is -log sigma(-m) = log(1 + e^m): margins [1, 0, -1, 2]
    torch.manual_seed(0)
    module = DPOModule("embedded:tiny-t5", dtype="float32")
    margin = torch.tensor([1.0, 0.0, -1.0, 2.0])
    metrics = module.dpo_step({**fixed_pairs(module.policy), "margin": margin})
    assert_close(metrics["loss"], torch.log1p(margin.exp()).mean())
    # a margin column with a loss that has no place for it is refused in setup, before the model loads
    ipo = DPOModule("embedded:tiny-t5", loss_type="ipo")
    ipo.trainer = SimpleNamespace(datamodule=SimpleNamespace(columns=SimpleNamespace(margin="strength")))
    with pytest.raises(ValueError, match="data.margin_column.*model.loss_type=ipo"):
        ipo.setup("fit")
    assert "policy" not in ipo._modules


def test_lora_settings_may_be_a_dict():
    module = DPOModule("embedded:tiny-t5", lora={"r": 4, "alpha": 8})
    assert module.policy.model.peft_config["default"].r == 4 and module.hparams.lora["alpha"] == 8
    # checked in the constructor, naming the flag, as in every module (peft failed on it later)
    with pytest.raises(ValueError, match=r"model\.lora\.r and model\.lora\.alpha must be > 0"):
        DPOModule("embedded:tiny-t5", lora={"r": 0})


@pytest.mark.parametrize("model_name", ["embedded:tiny-t5", "embedded:tiny-gpt2"])
def test_at_step_zero_the_loss_is_log_2_and_the_rewards_are_zero(model_name):
    # a fresh LoRA (B = 0) is the reference: h = 0 for every pair
    torch.manual_seed(0)
    module = DPOModule(model_name, dtype="float32")
    metrics = module.dpo_step(fixed_pairs(module.policy))
    assert_close(metrics["loss"], torch.tensor(math.log(2.0)))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert_close(metrics[key], torch.tensor(0.0))
    assert metrics["logps/chosen"] < 0 and metrics["logps/rejected"] < 0


def test_ipo_averages_the_log_probs_over_tokens_by_default():
    # TRL's IPO divides each response's log-prob by its length; logp_reduction=sum keeps DPO's sums
    torch.manual_seed(0)
    ipo = DPOModule("embedded:tiny-t5", dtype="float32", loss_type="ipo", beta=0.1)
    pairs = fixed_pairs(ipo.policy)
    metrics = ipo.dpo_step(pairs)
    assert_close(metrics["loss"], torch.tensor(25.0))  # (0 - 1 / (2 * 0.1))^2 at step zero
    summed = DPOModule("embedded:tiny-t5", dtype="float32", loss_type="ipo", logp_reduction="sum")
    summed.policy.load_state_dict(ipo.policy.state_dict())
    chosen_sum = summed.pair_logps(pairs)[0]
    assert_close(ipo.pair_logps(pairs)[0], chosen_sum / pairs["chosen_mask"].sum(-1))


def test_a_batch_without_pairs_is_refused_naming_the_data_module():
    module = DPOModule("embedded:tiny-t5", dtype="float32")
    batch = fixed_pairs(module.policy)
    del batch["rejected_ids"]
    with pytest.raises(ValueError, match="rejected_ids missing.*data.class_path"):
        module.dpo_step(batch)


def test_a_separate_reference_model_is_the_reference():
    torch.manual_seed(0)
    module = DPOModule("embedded:tiny-gpt2", dtype="float32", reference_model="embedded:tiny-gpt2")
    assert module.policy.reference is not None
    perturb_lora(module.policy.model)  # the policy moves; the separate reference does not
    pairs = fixed_pairs(module.policy)
    policy_chosen, _, ref_chosen, _ = module.pair_logps(pairs)
    own = DPOModule("embedded:tiny-gpt2", dtype="float32")
    _, _, own_ref_chosen, _ = own.pair_logps(pairs)
    assert_close(ref_chosen, own_ref_chosen)  # the same base weights
    assert not torch.allclose(policy_chosen, ref_chosen)


def test_bad_settings_fail_naming_the_flag():
    with pytest.raises(ValueError, match="model.beta"):
        DPOModule(beta=0.0)
    with pytest.raises(ValueError, match="model.label_smoothing"):
        DPOModule(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="model.loss_type"):
        DPOModule(loss_type="hinge")


class Recorder(L.Callback):
    def __init__(self):
        self.margins: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.margins.append(float(trainer.callback_metrics["train/rewards/margins"]))


@pytest.fixture(scope="module", params=["embedded:tiny-t5", "embedded:tiny-gpt2"])
def fitted(request, tmp_path_factory):
    """A short DPO fit on a tiny model: chosen is always one phrase, rejected another."""
    tmp = tmp_path_factory.mktemp("dpo")
    torch.manual_seed(0)
    module = DPOModule(request.param, dtype="float32", learning_rate=5e-3, beta=0.5)
    batch = fixed_pairs(module.policy)
    loader = torch.utils.data.DataLoader([batch] * 12, batch_size=None)
    recorder = Recorder()
    trainer = L.Trainer(default_root_dir=tmp, max_steps=12, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, callbacks=[recorder])
    trainer.fit(module, loader, torch.utils.data.DataLoader([batch], batch_size=None))
    recorder.final = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return module, recorder, batch, tmp / "adapter"


def test_a_short_fit_raises_the_margin(fitted):
    module, recorder, batch, _ = fitted
    assert recorder.margins[-1] > recorder.margins[0] + 0.1
    names = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected"]  # TRL's DPOTrainer metrics
    assert {f"{stage}/{name}" for stage in ("train", "val") for name in names} <= set(recorder.final)
    assert recorder.final["val/rewards/margins"] > 0.1
    after = module.dpo_step(batch)
    assert after["loss"] < math.log(2.0) and after["rewards/accuracies"] == 1.0


def test_the_export_loads_with_plain_peft_and_as_init_adapter(fitted):
    from peft import PeftModel

    from lit_rlhf.models import ResponseBatch, load_causal_or_seq2seq
    from lit_rlhf.models import resolve_model_path

    module, _, batch, export = fitted
    assert (export / "adapter_config.json").is_file()
    module.eval()
    pairs = ResponseBatch(batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["chosen_ids"],
                          batch["chosen_mask"])
    rows = [torch.arange(len(batch["chosen_ids"]))]
    expected = module.policy.score(pairs, rows, policy=True, values=False, reference=False).logprobs
    # plain peft on the base model: the same logits, hence the same log-probs
    base = load_causal_or_seq2seq(resolve_model_path(module.policy.model_name))
    loaded = PeftModel.from_pretrained(base, export).eval()
    with torch.no_grad():
        logits, _ = module.policy.lm.teacher_forced(loaded, *pairs.tensors())
    logprobs = torch.log_softmax(logits.float(), -1).gather(-1, pairs.response_ids.unsqueeze(-1)).squeeze(-1)
    assert_close(logprobs * pairs.response_mask, expected, atol=1e-5, rtol=1e-5)
    # PPO's model.init_adapter merges it: its reference is the DPO policy
    ppo_policy = Policy(module.policy.model_name, init_adapter=str(export), value_head=False).eval()
    reference = ppo_policy.score(pairs, rows, policy=False, values=False, reference=True).ref_logprobs
    assert_close(reference, expected, atol=1e-5, rtol=1e-5)


def test_checkpoints_hold_only_the_adapter(fitted):
    module = fitted[0]
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all("lora_" in key for key in checkpoint["state_dict"])
    fresh = DPOModule(module.policy.model_name, dtype="float32")
    fresh.configure_model()  # as a Trainer does before it loads a checkpoint
    fresh.load_state_dict(checkpoint["state_dict"], strict=False)
    assert_close(fresh.state_dict(), module.state_dict())


def test_lit_rlhf_dpo_learns_preference_pairs_and_exports_an_init_adapter(tmp_path, monkeypatch):
    """The command on PreferenceDataModule batches (a JSONL of text pairs): the held-out margin rises from 0,
    and the exported adapter is what ``lit-rlhf fit --model.init_adapter`` takes."""
    from lit_rlhf.cli import run_dpo
    from conftest import good_bad_pairs

    monkeypatch.chdir(tmp_path)
    source = tmp_path / "pairs.jsonl"
    write_jsonl(source, good_bad_pairs(40))
    common = ["--model.model_name", "embedded:tiny-gpt2", "--data.dataset", str(source), "--data.batch_size", "4",
              "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--model.beta", "0.5",
              "--model.learning_rate", "5e-3", "--model.lora.r", "4"]
    before = run_dpo(["validate", *common])
    assert before.trainer.callback_metrics["val/loss"].item() == pytest.approx(math.log(2), abs=1e-5)
    cli = run_dpo(["fit", *common, "--trainer.max_steps", "16"])
    assert cli.trainer.callback_metrics["val/rewards/margins"].item() > 0.1
    adapter = Path(cli.trainer.log_dir) / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (Path(cli.trainer.log_dir) / "config.yaml").is_file()
    policy = Policy("embedded:tiny-gpt2", init_adapter=str(adapter))
    assert policy.init_adapter == str(adapter)
    with pytest.raises(SystemExit):
        run_dpo(["predict", *common])


def test_a_resumed_dpo_fit_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """4 steps, then resumed from that checkpoint to 8 (shuffled prompt stream, optimizer, step): the adapter
    equals that of 8 steps in one go, bit for bit."""
    from lit_rlhf.cli import run_dpo
    from conftest import good_bad_pairs

    monkeypatch.chdir(tmp_path)
    write_jsonl(Path("pairs.jsonl"), good_bad_pairs(40))
    assert_resume_is_exact(run_dpo, [
        "--model.model_name", "embedded:tiny-gpt2", "--data.dataset", "pairs.jsonl", "--data.batch_size", "4",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--model.lora.r", "4",
        "--model.learning_rate", "5e-3", "--trainer.limit_val_batches", "0", "--seed_everything", "3"],
        "adapter/adapter_model.safetensors")


def test_pairs_longer_than_the_context_are_cut_to_fit_it_not_an_index_error(tmp_path, short_context_gpt2,
                                                                             datasets_cache):
    from lit_rlhf.data import PreferenceDataModule

    rows = [{"prompt": " ".join(f"w{k}" for k in range(6 * i + 6)) + " which is better?",
             "chosen": "the first one", "rejected": "the second one by far"} for i in range(8)]
    data = PreferenceDataModule(model_name=str(short_context_gpt2), test_size=0.25, batch_size=2, eval_batch_size=8,
                                dataset=str(write_jsonl(tmp_path / "p.jsonl", rows)))
    data.prepare_data()
    data.setup("fit")
    fitted = list(data.train_set) + list(data.test_set)
    module = DPOModule(str(short_context_gpt2), dtype="float32")
    assert torch.isfinite(module.dpo_step(data.collator(fitted))["loss"])  # every pair, as one batch
    assert len(fitted) == 8 and data.summary()["prompts_cut"] > 0
    assert all(len(r["input_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= 32 for r in fitted)
    assert all(r["query"].endswith(" which is better?") for r in fitted)
    # truncation=drop: the long pairs go, counted as too long
    short = [{**row, "prompt": "which is better?"} for row in rows]
    dropped = PreferenceDataModule(model_name=str(short_context_gpt2), truncation="drop", test_size=0.25,
                                   dataset=str(write_jsonl(tmp_path / "p.jsonl", rows + short)))
    dropped.prepare_data()
    dropped.setup("fit")
    kept = list(dropped.train_set) + list(dropped.test_set)
    assert dropped.summary()["skipped_too_long"] == 16 - len(kept) == 7 and dropped.summary()["prompts_cut"] == 0


@pytest.mark.parametrize("entry, reads", [("run_dpo", False), ("run_rm", True)])
def test_only_lit_rlhf_rm_gives_its_pairs_classifier_inputs(entry, reads, tmp_path, monkeypatch):
    """lit-rlhf-dpo's pairs are not limited by a classifier no one runs; lit-rlhf-rm's reward model reads them."""
    import lit_rlhf.cli.base as cli_base
    import lit_rlhf.cli.preferences as cli_module

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    monkeypatch.setattr(cli_base.CommonCLI, "_run_subcommand", lambda self, subcommand: None)  # parse only
    cli = getattr(cli_module, entry)(["fit", "--model.model_name", "embedded:tiny-gpt2",
                                      "--data.dataset", "pairs.jsonl"])
    assert cli.datamodule.classifier_inputs is reads


def test_a_resumed_dpo_fit_with_gradient_accumulation_ends_with_the_weights_of_an_uninterrupted_one(
        tmp_path, monkeypatch):
    """Two batches a step, 9 batches an epoch: resumed from step 2 (the middle of the epoch), Lightning must still
    step the optimizer on every second batch, not on the first batch after the restart as the epoch's last."""
    from lit_rlhf.cli import run_dpo
    from conftest import good_bad_pairs

    monkeypatch.chdir(tmp_path)
    write_jsonl(Path("pairs.jsonl"), good_bad_pairs(40))
    assert_resume_is_exact(run_dpo, [
        "--model.model_name", "embedded:tiny-gpt2", "--data.dataset", "pairs.jsonl", "--data.batch_size", "4",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--model.lora.r", "4",
        "--model.learning_rate", "5e-3", "--trainer.limit_val_batches", "0", "--seed_everything", "3",
        "--trainer.accumulate_grad_batches", "2"], "adapter/adapter_model.safetensors", steps=4)
