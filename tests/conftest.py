"""Shared fixtures: embedded tiny models built once per session into a temporary cache."""

import os
import sys
from pathlib import Path

# Offline before huggingface_hub is imported (it reads these once): a hub name fails at once instead of
# retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lit_rlhf.rewards import Reward  # noqa: E402

# Tiny models on 2 cores: one thread avoids oversubscription and is faster for these sizes.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def embedded_cache(tmp_path_factory):
    """Build embedded models into a per-session cache, unless the environment already names one."""
    if "LIT_RLHF_CACHE" not in os.environ:
        os.environ["LIT_RLHF_CACHE"] = str(tmp_path_factory.mktemp("lit_rlhf_cache"))
    return os.environ["LIT_RLHF_CACHE"]


@pytest.fixture(autouse=True)
def user_reward_modules(monkeypatch):
    """FunctionReward appends the current directory to sys.path and imports the user's module: tests that
    chdir to their own folder and write a ``my_rewards.py`` there get a fresh import each, not an earlier test's."""
    import sys

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    yield
    sys.modules.pop("my_rewards", None)


@pytest.fixture
def datasets_cache(monkeypatch, tmp_path):
    """Small local data files are converted into this test's folder, not the user's datasets cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """``rows`` as a JSONL file at ``path``; returns ``path``."""
    import json

    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def assert_resume_is_exact(run, args: list[str], weights_file: str, steps: int = 8) -> None:
    """``run`` (a CLI entry such as ``lit_rlhf.cli.run_dpo``) fits ``steps`` steps in one go, writing a periodic
    checkpoint mid-epoch at step ``steps // 2`` (what a run killed after that point leaves behind: the process
    only goes on from there); a fit resumed from that checkpoint exports the same ``<log_dir>/<weights_file>``
    tensors, bit for bit, after training the other half."""
    from safetensors.torch import load_file

    def weights(cli) -> dict:
        return load_file(str(Path(cli.trainer.log_dir) / weights_file))

    periodic = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                f"--trainer.callbacks.every_n_train_steps={steps // 2}", "--trainer.callbacks.save_top_k=-1",
                "--trainer.callbacks.filename={step}"]
    straight = run(["fit", *args, *periodic, "--trainer.max_steps", str(steps)])
    ckpt = next(Path(straight.trainer.log_dir).rglob(f"step={steps // 2}.ckpt"))
    half = torch.load(ckpt, weights_only=True)
    assert half["global_step"] == steps // 2
    end = torch.load(next(Path(straight.trainer.log_dir).rglob(f"step={steps}.ckpt")), weights_only=True)
    assert any(not torch.equal(end["state_dict"][k], v) for k, v in half["state_dict"].items())  # it trained on
    whole = weights(straight)  # read now: a resumed PPO fit continues in the run's own folder, over this export
    resumed = run(["fit", *args, "--trainer.max_steps", str(steps), "--ckpt_path", str(ckpt)])
    assert resumed.trainer.global_step == steps
    again = weights(resumed)
    assert whole.keys() == again.keys()
    assert [k for k in whole if not torch.equal(whole[k], again[k])] == []


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""A small chat template: each turn ``<|role|>content`` on a line, the generation prompt ``<|assistant|>``."""


@pytest.fixture
def qwen_with_chat_template(tmp_path) -> Path:
    """A tiny Qwen2-shaped model folder (config only: the data modules read no weights) whose tokenizer, the
    embedded GPT-2 one, has :data:`CHAT_TEMPLATE`."""
    from transformers import AutoTokenizer, Qwen2Config

    from lit_rlhf.models import resolve_model_path

    folder = tmp_path / "tiny-qwen"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded:tiny-gpt2"))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1).save_pretrained(folder)
    return folder


END_OF_TURN = "<|end|>"
"""The special token that ends each turn of :data:`EOT_CHAT_TEMPLATE` (as Gemma's ``<end_of_turn>``, Llama-3's
``<|eot_id|>``): not the tokenizer's eos."""

EOT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""A chat template whose turns end in :data:`END_OF_TURN`, then a newline."""


@pytest.fixture
def qwen_with_end_of_turn(tmp_path) -> Path:
    """As ``qwen_with_chat_template``, with :data:`EOT_CHAT_TEMPLATE` and ``<|end|>`` added as a special token."""
    from transformers import AutoTokenizer, Qwen2Config

    from lit_rlhf.models import resolve_model_path

    folder = tmp_path / "tiny-qwen-eot"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded:tiny-gpt2"))
    tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_TURN]})
    tokenizer.chat_template = EOT_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def short_context_gpt2(tmp_path_factory) -> Path:
    """A tiny GPT-2 with a 32-position context (the embedded GPT-2's tokenizer, random weights): rows of ordinary
    length overflow it."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from lit_rlhf.models import resolve_model_path

    folder = tmp_path_factory.mktemp("gpt2") / "short"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded:tiny-gpt2"))
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_classifier(path: Path, sentences: list[str], max_tokens: int = 512) -> Path:
    """A tiny RoBERTa sequence classifier (labels nothate / hate) and its word-level tokenizer, saved with
    ``save_pretrained`` like a hub model, standing in for the recipe's hate-speech classifier."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForSequenceClassification

    # RoBERTa's special-token ids: <s>=0, <pad>=1, </s>=2; position ids start after the pad id.
    words = sorted({w for s in sentences for w in s.split()})
    vocab = {tok: i for i, tok in enumerate(["<s>", "<pad>", "</s>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=max_tokens,
    )
    config = RobertaConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=max_tokens + 2, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        id2label={0: "nothate", 1: "hate"}, label2id={"nothate": 0, "hate": 1},
    )
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def perturb_lora(model: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    """Give every lora_B (zero at construction) random values, so that the adapter changes the function."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


class ShortnessReward(Reward):
    """Higher for shorter responses: a signal PPO must learn within a few steps (emit eos early)."""

    def compute(self, prompts, responses, references):
        return torch.tensor([-len(r) / 20.0 for r in responses])


@pytest.fixture
def log_ratios(monkeypatch):
    """Every PPO mini-batch's masked log importance ratio log(pi / pi_old) [b, t], in update order: the first
    is the one computed before any weight moved."""
    from lit_rlhf import objectives

    objective_lib = sys.modules[objectives.ppo_objective.__module__]  # where ppo_objective looks it up
    recorded = []
    original = objective_lib.ppo_diagnostics

    def recording_diagnostics(logprobs, old_logprobs, values, old_values, response_mask, *args):
        recorded.append(((logprobs - old_logprobs) * response_mask).detach().clone())
        return original(logprobs, old_logprobs, values, old_values, response_mask, *args)

    monkeypatch.setattr(objective_lib, "ppo_diagnostics", recording_diagnostics)
    return recorded


def fit_ppo(module, root: Path, batch_size: int = 8, ckpt_path=None, callbacks=(), split: str = "test",
            **trainer_kwargs):
    """Fit a PPOModule on the bundled DialogSum prompts (of ``split``: the test split's 1,500 dialogues are
    quicker to filter and encode than the train split's 12,460), on the CPU, without a logger; returns the trainer
    and a MetricsRecorder of its steps."""
    from lit_rlhf.data import DialogSumDataModule

    recorder = MetricsRecorder()
    trainer = L.Trainer(
        default_root_dir=root, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[recorder, *callbacks], **trainer_kwargs,
    )
    data = DialogSumDataModule(model_name=module.hparams.model_name, batch_size=batch_size, eval_batch_size=8,
                               split=split)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer, recorder


class MetricsRecorder(L.Callback):
    """The trainer's callback metrics (progress-bar values such as ``reward`` and ``kl``) after every step."""

    def __init__(self):
        self.history: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.history.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def fake_sharding(sharding: str, module: torch.nn.Module, params: list[torch.nn.Parameter], monkeypatch):
    """A strategy that stands in for ``deepspeed_zero3`` or ``fsdp`` sharding ``params`` over processes: the live
    ``params`` become zeros (this process's shard, not the trained weights), and only inside the strategy's gathering
    (DeepSpeed's ``GatheredParameters``, FSDP's full ``state_dict_type``) do they hold the trained weights."""
    import importlib.machinery
    import sys
    import types
    from contextlib import contextmanager
    from types import SimpleNamespace

    full = [p.detach().clone() for p in params]

    def put(values):
        with torch.no_grad():
            for param, value in zip(params, values):
                param.copy_(value)

    @contextmanager
    def gathering(*args, **kwargs):
        put(full)
        try:
            yield
        finally:
            put([torch.zeros_like(p) for p in params])

    put([torch.zeros_like(p) for p in params])
    if sharding == "deepspeed_zero3":
        deepspeed = types.ModuleType("deepspeed")  # with a spec: transformers looks for the package when loading
        deepspeed.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None)
        deepspeed.zero = SimpleNamespace(GatheredParameters=gathering)
        monkeypatch.setitem(sys.modules, "deepspeed", deepspeed)
        return SimpleNamespace(zero_stage_3=True)
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    strategy = FSDPStrategy()
    # the full state dict FSDP gathers: copies on the CPU (offload_to_cpu), keyed as the LightningModule's
    strategy.model = SimpleNamespace(state_dict=lambda: {k: v.clone() for k, v in module.state_dict().items()})
    monkeypatch.setattr(FullyShardedDataParallel, "state_dict_type", gathering)
    return strategy


def good_bad_pairs(n: int) -> list[dict]:
    things = ["cat", "dog", "tree", "car", "song", "book", "city", "lake", "film", "game"]
    return [{"prompt": f"what about the {things[i % 10]} number {i}?",
             "chosen": f"the {things[(i + 3) % 10]} is good", "rejected": f"the {things[(i + 7) % 10]} is bad"}
            for i in range(n)]


def dialogue_rows(n: int) -> list[dict]:
    """``n`` short (dialogue, summary) rows of different lengths: a few training batches per epoch."""
    return [{"id": str(i), "dialogue": f"#Person1#: I need {i} apples{' today' * (i % 4)}.\n#Person2#: Here they are.",
             "summary": f"Person1 buys {i} apples."} for i in range(n)]
