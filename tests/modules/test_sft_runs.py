"""SFTModule's runs: predictions, resuming (exactly), the embedded summarizers, one-line errors, and several
processes (the loss's global token mean, sharded exports, the data stream, each process's RNG)."""

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.testing import assert_close
from transformers import T5ForConditionalGeneration

from conftest import assert_resume_is_exact, dialogue_rows, fake_sharding, perturb_lora, write_jsonl
from lit_rlhf.cli import run_sft
from lit_rlhf.data import DialogSumDataModule
from lit_rlhf.models import Policy
from lit_rlhf.modules import SFTModule
from sft_data import batch_of, supervised_data


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
