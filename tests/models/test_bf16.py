"""A bfloat16 frozen base (``model.dtype: bfloat16``): the trained weights (LoRA adapter, value head) and AdamW's
state stay float32, log-probabilities and values come out float32, both rollout paths agree with the update's
forward, and the exported adapter is float32 and loads with plain peft.

Tolerances. Exact mode (``fast_rollout: false``) scores the rollout with the same computation as the update's
first forward, and the reference is the same bf16 base with the adapter disabled (LoRA B starts at zero, so
peft adds exactly 0): KL and the first log-ratio are exactly 0 in bf16 too. The cached decode loop computes
the same logits with other matrix shapes (one position at a time against a KV cache), and bf16 keeps 8
significant bits of every product and of the logits themselves (a logit near 10 is rounded to a step of
0.06), so the two differ by rounding. The limits below are a few times the largest differences measured on
these models (bf16 on a CPU with AMX, torch 2.13; 8 DialogSum prompts, seeds 0-9 or 0-7; the float32 figures,
for comparison, are ~1e-6).
"""

from pathlib import Path

import lightning as L
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from torch.testing import assert_close

from lit_rlhf.data import DialogSumDataModule
from lit_rlhf.modules import PPOModule
from lit_rlhf.models import Policy, ResponseBatch, load_causal_or_seq2seq
from lit_rlhf.settings import GenerationSettings, LoraSettings
from lit_rlhf.rewards import ProfanityReward
from lit_rlhf.modules.base import check_precision
from lit_rlhf.modules import SFTModule
from lit_rlhf.models import resolve_model_path

from conftest import fit_ppo, perturb_lora

T5, GPT2 = "embedded:tiny-t5", "embedded:tiny-gpt2"
MODELS = pytest.mark.parametrize("name", [T5, GPT2], ids=["t5", "gpt2"])
SHORT = GenerationSettings(min_new_tokens=1, max_new_tokens=(4, 12))

# fast_rollout, first mini-batch: max |ratio - 1| measured 0.028 (T5), 0.00097 (GPT-2) over seeds 0-7;
# mean KL per response at step 1: |0.0031|, |0.00023|
FAST_RATIO_TOL = {T5: 0.1, GPT2: 0.005}
FAST_KL_TOL = {T5: 0.01, GPT2: 1e-3}
# cached loop vs Policy.score (adapter perturbed, 8 prompts, 117-152 response tokens; seeds 0-9): max |delta log p|
# measured 0.051 (T5), 0.0030 (GPT-2); its mean 0.0057, 1.8e-4; max |delta value| 0.026, 0.0084
DECODE_TOL = {T5: {"max": 0.15, "mean": 0.02, "values": 0.1}, GPT2: {"max": 0.01, "mean": 1e-3, "values": 0.03}}


def bf16_module(name: str, **kwargs) -> PPOModule:
    defaults = dict(model_name=name, reward=ProfanityReward(), generation=SHORT, ppo_steps=1, rollout_batch_size=8,
                    mini_batch_size=4, learning_rate=1e-2, log_samples_every=0, export_adapter=False, dtype="bfloat16")
    return PPOModule(**{**defaults, **kwargs})


def assert_bf16_base_float32_trained(policy: Policy) -> None:
    frozen = [p for p in policy.parameters() if not p.requires_grad]
    trained = policy.trainable_parameters()
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert trained and all(p.dtype == torch.float32 for p in trained)


def prompts(name: str, n: int = 8) -> dict:
    """The first ``n`` bundled DialogSum training prompts, padded as the model kind needs."""
    data = DialogSumDataModule(model_name=name, batch_size=n)
    data.prepare_data()
    data.setup("fit")
    return next(iter(data.train_dataloader()))


@MODELS
def test_exact_rollout_kl_zero_first_ratio_one_and_float32_training(name, tmp_path, log_ratios):
    torch.manual_seed(0)
    module = bf16_module(name, ppo_steps=2, export_adapter=True, fast_rollout=False)
    assert_bf16_base_float32_trained(module.policy)
    trainer, recorder = fit_ppo(module, tmp_path)

    # 1) policy == reference == the bf16 base at the first rollout, scored as the update scores it
    assert recorder.history[0]["kl"] == 0.0
    assert log_ratios[0].dtype == torch.float32 and torch.count_nonzero(log_ratios[0]) == 0
    assert len(log_ratios) == 4 and torch.count_nonzero(log_ratios[1]) > 0  # the first update moved the policy

    # 2) the adapter was trained, in float32, by an AdamW whose moments are float32; the base stayed bf16
    assert any(p.abs().sum() > 0 for n, p in module.policy.named_parameters() if "lora_B" in n)
    assert_bf16_base_float32_trained(module.policy)
    state = trainer.optimizers[0].state
    assert len(state) == len(module.policy.trainable_parameters())
    assert {s[k].dtype for s in state.values() for k in ("exp_avg", "exp_avg_sq")} == {torch.float32}

    # 3) the exported adapter is float32 and, loaded with plain peft onto the bf16 base, is the trained policy
    adapter_dir = Path(trainer.default_root_dir) / "adapter"
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    assert {t.dtype for t in torch.load(adapter_dir / "value_head.pt").values()} == {torch.float32}
    policy = module.policy.eval()
    batch = prompts(name, 4)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    response, response_mask = policy.generate(ids, mask, SHORT)
    expected = policy(ids, mask, response, response_mask).logprobs
    base = load_causal_or_seq2seq(resolve_model_path(name), torch.bfloat16)
    trained_model, policy.model = policy.model, PeftModel.from_pretrained(base, adapter_dir).eval()
    try:
        assert_close(policy(ids, mask, response, response_mask).logprobs, expected)
    finally:
        policy.model = trained_model


@MODELS
def test_fast_rollout_first_ratio_is_one_up_to_bf16_rounding(name, tmp_path, log_ratios):
    torch.manual_seed(0)
    module = bf16_module(name, fast_rollout=True)
    _, recorder = fit_ppo(module, tmp_path)
    assert_bf16_base_float32_trained(module.policy)
    assert abs(recorder.history[0]["kl"]) < FAST_KL_TOL[name]
    ratio = log_ratios[0].exp()  # 1 outside the response mask
    assert (ratio - 1).abs().max() < FAST_RATIO_TOL[name]


@MODELS
def test_cached_decode_scores_like_teacher_forcing_in_bf16(name):
    torch.manual_seed(0)
    policy = Policy(name, dtype="bfloat16").eval()
    perturb_lora(policy.model, scale=0.3)  # a non-zero adapter, so both passes go through it
    batch = prompts(name)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = policy.sample(ids, mask, GenerationSettings(min_new_tokens=1), torch.randint(8, 24, (8,)))
    rows = ResponseBatch(ids, mask, out.response_ids, out.response_mask)
    scores = policy.score(rows, [torch.arange(8)], reference=False)
    m = out.response_mask.bool()
    assert out.logprobs.dtype == scores.logprobs.dtype == out.values.dtype == torch.float32
    # the model really computes in bf16: its logits come out bf16 (log-probs are upcast from them)
    assert policy(ids[:1], mask[:1], out.response_ids[:1], out.response_mask[:1], return_logits=True).logits.dtype \
        == torch.bfloat16
    logprob_error, value_error = (out.logprobs - scores.logprobs)[m].abs(), (out.values - scores.values)[m].abs()
    tol = DECODE_TOL[name]
    assert logprob_error.max() < tol["max"] and logprob_error.mean() < tol["mean"], logprob_error.max()
    assert value_error.max() < tol["values"], value_error.max()


@MODELS
def test_reference_is_the_bf16_base_and_equals_the_policy_at_start(name, tmp_path):
    # a separate reference model is loaded in bf16 too; an init_adapter is merged into the bf16 base
    sft = Policy(name, dtype="bfloat16", value_head=False)
    perturb_lora(sft.model, scale=0.3)
    init_adapter = sft.save_adapter(tmp_path / "sft")
    batch = prompts(name, 4)
    response, response_mask = sft.generate(batch["input_ids"], batch["attention_mask"], SHORT)
    rows = ResponseBatch(batch["input_ids"], batch["attention_mask"], response, response_mask)
    separate = Policy(name, dtype="bfloat16", reference_model=resolve_model_path(name)).eval()
    merged = Policy(name, dtype="bfloat16", init_adapter=str(init_adapter)).eval()
    assert {p.dtype for p in separate.reference.parameters()} == {torch.bfloat16}
    assert_bf16_base_float32_trained(merged)
    for policy in (separate, merged):
        scores = policy.score(rows, [torch.arange(4)], values=False)
        assert torch.equal(scores.logprobs, scores.ref_logprobs)  # KL exactly 0 at the start
    # the merged reference is the fine-tuned model up to the bf16 rounding of the merged weights (measured: 3% of
    # the fine-tuned model's distance from the raw base on T5, 1% on GPT-2), not the raw base
    fine_tuned = sft.score(rows, [torch.arange(4)], values=False, reference=False).logprobs
    raw_base = separate.score(rows, [torch.arange(4)], values=False).ref_logprobs
    merged_ref = merged.score(rows, [torch.arange(4)], values=False).ref_logprobs
    assert (merged_ref - fine_tuned).abs().max() < 0.1 * (raw_base - fine_tuned).abs().max()


def test_sft_trains_a_float32_adapter_on_a_bf16_base(tmp_path):
    torch.manual_seed(0)
    module = SFTModule(T5, dtype="bfloat16", learning_rate=1e-2, export_dir=str(tmp_path / "adapter"))
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=3, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    data = DialogSumDataModule(model_name=T5, with_labels=True, max_chars=500, max_prompt_tokens=64,
                               max_summary_tokens=16, batch_size=4)
    trainer.fit(module, data)
    assert_bf16_base_float32_trained(module.policy)
    assert any(p.abs().sum() > 0 for n, p in module.policy.named_parameters() if "lora_B" in n)
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


@pytest.mark.parametrize("make, message", [
    (lambda: Policy(T5, finetune="full", dtype="bfloat16", value_head=False),
     "model.finetune=full trains every weight, which model.dtype=bfloat16"),
    (lambda: SFTModule(T5, finetune="full", init_from_scratch=True, dtype="bfloat16"), "model.finetune=full"),
    (lambda: Policy(GPT2, dtype="bfloat16", lora=LoraSettings(bias="all")), "model.lora.bias=all trains the base"),
    (lambda: PPOModule(dtype="float64"), "model.dtype must be one of"),
], ids=["full", "sft-full", "lora-bias", "unknown"])
def test_half_precision_trained_base_weights_are_refused_before_loading(make, message, monkeypatch):
    monkeypatch.setattr("lit_rlhf.models.policy.load_base_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("precision, dtype, message", [
    ("bf16-true", "bfloat16", "trainer.precision='bf16-true' casts the trained weights"),
    ("32-true", "float16", "model.dtype=float16 on a CPU"),
])
def test_fit_refuses_half_precision_trained_weights_and_float16_on_cpu(precision, dtype, message, tmp_path):
    module = bf16_module(GPT2, dtype=dtype)
    with pytest.raises(ValueError, match=message):
        fit_ppo(module, tmp_path, precision=precision)
    assert module.ppo_step == 0


def test_precision_rules():
    check_precision("32-true", "float16", torch.device("cuda"))  # float16 stays available on a GPU
    check_precision("bf16-mixed", "bfloat16", torch.device("cpu"))  # autocast over a bf16 base
    check_precision("16-mixed", "float32", "cpu", gradient_scaler=True)  # SFT: automatic optimization scales
    for precision in ("16-true", "bf16-true"):
        with pytest.raises(ValueError, match="model.dtype=bfloat16"):
            check_precision(precision, gradient_scaler=True)
