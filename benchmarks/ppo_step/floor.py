"""The bare-PyTorch floor: the least work of one PPO step on the same weights, written by hand."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ppo_step.machine import MemoryWatch, log, timed
from ppo_step.records import parameter_dtypes, step_record, write_profile
from ppo_step.settings import PPO
from ppo_step.workloads import make_scorer


class Floor:
    """The least work of one PPO step in bare PyTorch on the same weights (transformers' T5 blocks + peft LoRA):
    one encoder pass and a KV-cached decode loop (eval mode) that keeps each sampled token's log-prob and value
    and drops every row from the batch once it has its length; one reference forward per length-sorted group
    with the adapter disabled; one forward + backward + AdamW step per mini-batch (eval mode: no dropout).
    ``dtype`` bfloat16: the frozen weights in bf16; LoRA (peft's autocast_adapter_dtype), the value head (fed
    float32 hidden states) and AdamW's state float32; log-probs from float32 logits."""

    def __init__(self, model_dir: str, dtype: str = "float32") -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        lora = LoraConfig(r=PPO.lora_r, lora_alpha=PPO.lora_alpha, target_modules=list(PPO.lora_targets),
                          lora_dropout=PPO.lora_dropout, bias="none", task_type="SEQ_2_SEQ_LM")
        self.peft = get_peft_model(base, lora).eval()
        self.t5 = self.peft.base_model.model  # T5ForConditionalGeneration with LoRA layers inside
        self.value_head = torch.nn.Linear(self.t5.config.d_model, 1)
        params = [p for p in self.peft.parameters() if p.requires_grad] + list(self.value_head.parameters())
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=PPO.learning_rate, weight_decay=0.0)
        self.start_id = self.t5.config.decoder_start_token_id
        self.eos_id = self.t5.config.eos_token_id
        self.scale = self.t5.model_dim**-0.5 if self.t5.config.scale_decoder_outputs else 1.0
        self.generator = torch.Generator().manual_seed(0)
        self.first_ratio_error = None

    def parameter_count(self) -> dict[str, int]:
        all_ = sum(p.numel() for p in self.peft.parameters()) + sum(p.numel() for p in self.value_head.parameters())
        return {"all_with_value_head": all_, "trainable_with_value_head": sum(p.numel() for p in self.params)}

    def rollout(self, ids, mask, lengths):
        """Sampled tokens, their log-probs and values: [B, T] each (right-padded), in the input row order."""
        torch = self.torch
        B, T = len(lengths), int(lengths.max())
        order = torch.argsort(lengths, descending=True, stable=True)  # finished rows leave from the end
        ids, mask, lens = ids[order], mask[order], lengths[order]
        width = int(mask.sum(1).max())
        ids, mask = ids[:, :width], mask[:, :width]
        tokens = torch.zeros(B, T, dtype=torch.long)
        logps, values = torch.zeros(B, T), torch.zeros(B, T)
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        with torch.no_grad():
            enc = self.t5.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, P, d]
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            x = torch.full((B, 1), self.start_id, dtype=torch.long)
            alive = B
            for t in range(T):
                n = int((lens > t).sum())
                if n < alive:  # rows that have their length leave the batch (and the KV cache)
                    cache.batch_select_indices(torch.arange(n))
                    enc, mask, x, alive = enc[:n], mask[:n], x[:n], n
                h = self.t5.decoder(input_ids=x, encoder_hidden_states=enc, encoder_attention_mask=mask,
                                    cache=cache, use_cache=True).last_hidden_state[:, -1]  # [n, d]
                logits = self.t5.lm_head(h * self.scale).float()  # [n, V]
                logp = torch.log_softmax(logits, -1)
                probs = logp.exp()
                probs[:, self.eos_id] = 0.0  # end-of-sequence blocked until the row's length (min = max)
                tok = torch.multinomial(probs, 1, generator=self.generator)  # top_k 0, top_p 1: plain sampling
                tokens[:n, t] = tok[:, 0]
                logps[:n, t] = logp.gather(1, tok)[:, 0]
                values[:n, t] = self.value_head(h.float())[:, 0]
                x = tok
        unsort = torch.empty_like(order)
        unsort[order] = torch.arange(B)
        return tokens[unsort], logps[unsort], values[unsort]

    def teacher_forced(self, q, qm, r, rm, with_values: bool):
        """Log-probs [b, t] (and values) of response tokens r given queries q, one forward pass."""
        torch = self.torch
        start = torch.full_like(r[:, :1], self.start_id)
        dec_in = torch.cat([start, r[:, :-1]], 1)
        dec_mask = torch.cat([torch.ones_like(start), rm[:, :-1]], 1)
        enc = self.t5.encoder(input_ids=q, attention_mask=qm).last_hidden_state
        h = self.t5.decoder(input_ids=dec_in, attention_mask=dec_mask, encoder_hidden_states=enc,
                            encoder_attention_mask=qm, use_cache=False).last_hidden_state  # [b, t, d]
        logits = self.t5.lm_head(h * self.scale).float()
        logp = logits.gather(-1, r[..., None])[..., 0] - logits.logsumexp(-1)
        return logp, (self.value_head(h.float())[..., 0] if with_values else None)

    @staticmethod
    def groups(lengths, size: int):
        import torch

        order = torch.argsort(lengths, stable=True)
        return list(order.split(size))

    def trim(self, ids, mask, resp, rmask, idx):
        q, qm, r, rm = ids[idx], mask[idx], resp[idx], rmask[idx]
        width, t = int(qm.sum(1).max()), int(rm.sum(1).max())
        return q[:, :width], qm[:, :width], r[:, :t], rm[:, :t]

    def advantages(self, scores, logps, ref_logps, values, rmask):
        torch = self.torch
        rewards = -PPO.kl_coef * (logps - ref_logps) * rmask
        last = rmask.sum(1).long() - 1
        rewards[torch.arange(len(scores)), last] += scores
        adv = torch.zeros_like(rewards)
        gae = torch.zeros(len(scores))
        T = rewards.shape[1]
        for t in reversed(range(T)):
            next_v = values[:, t + 1] * rmask[:, t + 1] if t + 1 < T else torch.zeros(len(scores))
            delta = rewards[:, t] + PPO.gamma * next_v - values[:, t]
            gae = (delta + PPO.gamma * PPO.lam * gae) * rmask[:, t]
            adv[:, t] = gae
        returns = adv + values
        n = rmask.sum()
        mean = (adv * rmask).sum() / n
        var = (((adv - mean) * rmask) ** 2).sum() / (n - 1)
        return (adv - mean) * torch.rsqrt(var + 1e-8) * rmask, returns

    def update(self, ids, mask, resp, rmask, old_logps, old_values, adv, returns, groups) -> None:
        torch = self.torch
        for k in torch.randperm(len(groups), generator=self.generator).tolist():
            idx = groups[k]
            q, qm, r, rm = self.trim(ids, mask, resp, rmask, idx)
            t = r.shape[1]
            logp, v = self.teacher_forced(q, qm, r, rm, with_values=True)
            old_lp, old_v, a, ret = old_logps[idx, :t], old_values[idx, :t], adv[idx, :t], returns[idx, :t]
            ratio = torch.exp(logp - old_lp)
            if self.first_ratio_error is None:
                self.first_ratio_error = float(((ratio.detach() - 1).abs() * rm).max())
            n = rm.sum()
            pg = (torch.max(-a * ratio, -a * ratio.clamp(1 - PPO.cliprange, 1 + PPO.cliprange)) * rm).sum() / n
            v_clip = old_v + (v - old_v).clamp(-PPO.cliprange_value, PPO.cliprange_value)
            vf = 0.5 * (torch.max((v - ret) ** 2, (v_clip - ret) ** 2) * rm).sum() / n
            loss = pg + PPO.vf_coef * vf
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def step(self, batch, scorer) -> tuple[dict[str, float], int]:
        torch = self.torch
        phases: dict[str, float] = {}
        ids, mask, lengths = batch["input_ids"], batch["attention_mask"], batch["lengths"]
        with timed(phases, "generate"):
            resp, old_logps, old_values = self.rollout(ids, mask, lengths)
            rmask = (torch.arange(resp.shape[1])[None] < lengths[:, None]).long()
        with timed(phases, "reward"):
            texts = self.tokenizer.batch_decode(resp * rmask, skip_special_tokens=True)
            scores = scorer(batch["query"], texts)
        groups = self.groups(lengths, PPO.mini_batch)
        with timed(phases, "forward"):  # the reference only: the rollout kept the policy's log-probs and values
            ref_logps = torch.zeros_like(old_logps)
            with torch.no_grad(), self.peft.disable_adapter():
                for idx in groups:
                    q, qm, r, rm = self.trim(ids, mask, resp, rmask, idx)
                    ref_logps[idx, : r.shape[1]] = self.teacher_forced(q, qm, r, rm, with_values=False)[0]
        with timed(phases, "advantages"):
            adv, returns = self.advantages(scores, old_logps, ref_logps, old_values, rmask.float())
        with timed(phases, "update"):
            self.update(ids, mask, resp, rmask, old_logps, old_values, adv, returns, groups)
        return phases, int(rmask.sum())


def worker_floor(args: argparse.Namespace, work: dict[str, Any], out: dict[str, Any]) -> None:
    import torch

    scorer = make_scorer(args)
    floor = Floor(args.model_dir, args.dtype)
    out["parameters"] = floor.parameter_count()
    out["parameter_dtypes"] = parameter_dtypes(args.system, [*floor.peft.named_parameters(),
                                                             *floor.value_head.named_parameters()], args.dtype)
    memory = MemoryWatch()
    memory.start_steps()
    steps = []
    batches = work["batches"]
    measured = len(batches) - (1 if work["profile_batch"] else 0)
    for index in range(measured):
        start = time.perf_counter()
        phases, tokens = floor.step(batches[index], scorer)
        total = time.perf_counter() - start
        if index >= args.warmup:
            steps.append(step_record(phases, total, tokens))
        log(f"[floor] step {index}: {total:.2f} s " + " ".join(f"{k}={v:.2f}" for k, v in phases.items()))
    memory.end_steps()
    if work["profile_batch"] and args.profile_out:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            phases, tokens = floor.step(batches[-1], scorer)
            total = time.perf_counter() - start
        write_profile(prof, args.profile_out, f"bare PyTorch floor, workload {work['name']}")
        out["profiled_step"] = step_record(phases, total, tokens)
    out["first_minibatch_ratio_error"] = floor.first_ratio_error
    out["steps"] = steps
    out["memory"] = memory.report()
