"""PPOModule with model.finetune=full (every weight trained, no adapter): seq2seq and causal, critic and
critic-free; ratio 1 and (against a separate reference model) KL 0 at the first step; every weight moves; the
export is the whole model and reproduces the trained policy; checkpoints hold every weight and resume exactly; a KL
term without a reference model is refused."""

from pathlib import Path

import pytest
import torch
import yaml
from torch.testing import assert_close

from lit_rlhf.modules import PPOModule
from lit_rlhf.settings import GenerationSettings, PPOSettings

from conftest import ShortnessReward, assert_resume_is_exact, fit_ppo

SHORT = GenerationSettings(min_new_tokens=1, max_new_tokens=(4, 8))
CONFIGS = Path(__file__).parents[2] / "configs"


def full_module(model_name: str, estimator: str, **kwargs) -> PPOModule:
    # (T5 with sdpa attention: once every weight requires grad, torch picks another CPU attention kernel in the
    # update than in the no-grad scoring pass, and the first ratio is 1 only up to ~1e-6; eager attention is exact)
    kwargs.setdefault("attn_implementation", "eager" if "t5" in model_name else None)
    k = 2 if estimator == "grpo" else 1
    return PPOModule(model_name=model_name, finetune="full", reward=ShortnessReward(), generation=SHORT,
                     ppo=PPOSettings(advantage_estimator=estimator, **kwargs.pop("ppo", {})), samples_per_prompt=k,
                     rollout_batch_size=4, mini_batch_size=2 * k, learning_rate=1e-3, log_samples_every=0,
                     fast_rollout=False, **kwargs)


@pytest.mark.parametrize("model_name, estimator", [("embedded:tiny-t5", "gae"), ("embedded:tiny-gpt2", "grpo")])
def test_every_weight_trains_and_the_export_is_the_trained_model(model_name, estimator, tmp_path, log_ratios):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from lit_rlhf.models import load_causal_or_seq2seq, resolve_model_path

    torch.manual_seed(0)
    module = full_module(model_name, estimator, ppo=dict(init_kl_coef=0.0), ppo_steps=2)
    trainer, _ = fit_ppo(module, tmp_path, batch_size=4, enable_checkpointing=False)
    assert torch.count_nonzero(log_ratios[0]) == 0  # the first mini-batch: ratio exactly 1
    assert module.policy.reference is None  # init_kl_coef 0: no reference model
    start = load_causal_or_seq2seq(resolve_model_path(model_name)).state_dict()
    trained = module.policy.model.state_dict()
    assert trained.keys() == start.keys()  # the model itself, no adapter around it
    unchanged = [name for name, weight in trained.items() if torch.equal(weight, start[name])]
    assert unchanged == [], unchanged  # every weight (attention, MLP, norms, embeddings) was trained

    export = Path(trainer.log_dir or tmp_path) / "model"
    assert not (export.parent / "adapter").exists() and (export / "tokenizer_config.json").exists()
    auto = AutoModelForSeq2SeqLM if module.policy.is_seq2seq else AutoModelForCausalLM
    loaded = auto.from_pretrained(export).state_dict()
    assert [name for name in trained if not torch.equal(loaded[name], trained[name])] == []
    assert (export / "value_head.pt").exists() == (estimator == "gae")


@pytest.mark.parametrize("model_name", ["embedded:tiny-t5", "embedded:tiny-gpt2"])
def test_a_kl_term_compares_with_the_reference_model_kl_zero_at_the_first_step(model_name, tmp_path, log_ratios):
    import lightning as L

    with pytest.raises(ValueError, match="model.finetune=full .* give model.reference_model .*init_kl_coef=0"):
        full_module(model_name, "gae", ppo=dict(init_kl_coef=0.05))
    torch.manual_seed(0)
    module = full_module(model_name, "gae", ppo=dict(init_kl_coef=0.05), reference_model=model_name, ppo_steps=2)
    saves = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _, recorder = fit_ppo(module, tmp_path, batch_size=4, callbacks=[saves])
    # the checkpoint holds every trained weight and the value head, not the frozen reference model
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    trained = {f"policy.model.{name}" for name in module.policy.model.state_dict()}
    assert trained <= saved.keys() and "policy.value_head.summary.weight" in saved
    assert not [key for key in saved if key.startswith("policy.reference.")]
    assert recorder.history[0]["kl"] == 0.0 and torch.count_nonzero(log_ratios[0]) == 0  # policy == reference
    assert recorder.history[1]["kl"] != 0.0  # the trained weights moved away from the reference's
    policy, reference = module.policy.model.state_dict(), module.policy.reference.state_dict()
    assert any(not torch.equal(policy[name], weight) for name, weight in reference.items())
    start = full_module(model_name, "gae", ppo=dict(init_kl_coef=0.0))
    start.configure_model()
    assert_close(reference, start.policy.model.state_dict(), rtol=0, atol=0)  # the reference did not train


@pytest.mark.usefixtures("datasets_cache")
def test_a_resumed_full_finetune_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """configs/rlvr_arithmetic.yaml (finetune=full) on a few problems: 4 steps in one go, or 2 and resumed from
    that checkpoint (which holds every weight and the optimizer's state), export the same model, bit for bit."""
    from lit_rlhf.cli import run
    from lit_rlhf.data import arithmetic

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(arithmetic, "TRAIN_SIZE", 40)
    monkeypatch.setattr(arithmetic, "TEST_SIZE", 6)
    assert yaml.safe_load((CONFIGS / "rlvr_arithmetic.yaml").read_text())["model"]["finetune"] == "full"
    assert_resume_is_exact(run, [
        "--config", str(CONFIGS / "rlvr_arithmetic.yaml"), "--trainer.callbacks=[]",
        "--trainer.default_root_dir", ".", "--model.ppo_steps", "null", "--model.samples_per_prompt", "4",
        "--data.batch_size", "2", "--model.mini_batch_size", "8", "--seed_everything", "3"],
        "model/model.safetensors", steps=4)


def test_print_config_shows_finetune(capsys):
    from lit_rlhf.cli import run

    with pytest.raises(SystemExit):
        run(["fit", "--model.finetune", "full", "--model.ppo.init_kl_coef", "0", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["finetune"] == "full"
    with pytest.raises(ValueError, match="model.finetune must be lora or full, got 'half'"):
        PPOModule(model_name="embedded:tiny-gpt2", finetune="half")


def test_a_full_export_writes_the_given_gathered_weights(tmp_path):
    # under a sharding strategy the export gets the gathered weights (this process holds only a shard): the files
    # must be those weights, the value head's included, not the parameters this process holds
    from transformers import AutoModelForCausalLM

    from lit_rlhf.models import Policy, ValueHead

    policy = Policy("embedded:tiny-gpt2", finetune="full")
    gathered = {name: weight + 1.0 for name, weight in policy.state_dict().items()}
    directory = policy.save_adapter(tmp_path / "model", state_dict=gathered)
    head = ValueHead(policy.model.config.hidden_size)
    head.load_state_dict(torch.load(directory / "value_head.pt"))
    assert_close(head.summary.weight, gathered["value_head.summary.weight"], rtol=0, atol=0)
    loaded = AutoModelForCausalLM.from_pretrained(directory).state_dict()
    assert_close(loaded["transformer.h.0.attn.c_attn.weight"], gathered["model.transformer.h.0.attn.c_attn.weight"],
                 rtol=0, atol=0)
    with pytest.raises(ValueError, match="no 'model.\\*' or no 'value_head.\\*' weights"):
        policy.save_adapter(tmp_path / "bad", state_dict={k: v for k, v in gathered.items() if "value_head" not in k})


def test_a_checkpoint_of_the_other_kind_is_refused(tmp_path):
    # non-strict loading would otherwise load nothing of it and go on with the untrained weights
    from lit_rlhf.settings import LoraSettings

    full = full_module("embedded:tiny-gpt2", "grpo", ppo=dict(init_kl_coef=0.0))
    lora = PPOModule(model_name="embedded:tiny-gpt2", lora=LoraSettings(), ppo=PPOSettings(init_kl_coef=0.0))
    full.configure_model()
    lora.configure_model()
    full_state = {f"policy.{k}": v for k, v in full.policy.state_dict().items()}
    lora_state = {f"policy.{k}": v for k, v in lora.policy.state_dict().items() if "lora_" in k}
    with pytest.raises(ValueError, match="holds a LoRA adapter, but model.finetune=full"):
        full.on_load_checkpoint({"state_dict": lora_state, "lit_rlhf": {}})
    with pytest.raises(ValueError, match="holds every weight of a model.finetune=full run"):
        lora.on_load_checkpoint({"state_dict": full_state, "lit_rlhf": {}})
