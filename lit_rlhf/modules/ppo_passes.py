"""Which scoring passes a PPO step needs after generation; the ones that cannot change the result are not run.

    reference   none at ``init_kl_coef: 0`` (beta stays 0: the adaptive controller multiplies it): no reference
                model loaded, no adapter-disabled forward; the KL terms are 0 and the KL itself is not logged
    old         the current policy's log-probs before the update. Without fast rollout (which keeps the sampled
                tokens' log-probs while sampling: no pass to skip), an on-policy update (one epoch, the rollout
                as one mini-batch, no value head, no dropout) takes them from its own forward, detached, in the
                same micro-batches and padding as the scoring pass would: the same numbers, one forward fewer.
"""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_info

from lit_rlhf.models import is_encoder_decoder
from lit_rlhf.runtime import distributed as dist
from lit_rlhf.settings import PPOSettings


def reference_source(ppo: PPOSettings, reference_model: str | None, finetune: str = "lora") -> str | None:
    """The reference model to load: ``reference_model``, or None where no reference enters the step (or the
    adapter-disabled policy is the reference). A policy that trains every weight has no adapter to disable: with
    a KL term it needs ``reference_model``."""
    if finetune == "full" and ppo.uses_reference and reference_model is None:
        raise ValueError(f"model.finetune=full trains every weight, so no adapter can be disabled to give the KL "
                         f"term's reference (model.ppo.init_kl_coef={ppo.init_kl_coef}): give model.reference_model "
                         "(the model to stay close to, e.g. model_name) or set model.ppo.init_kl_coef=0")
    if reference_model is not None and not ppo.uses_reference:
        rank_zero_info(f"model.reference_model={reference_model!r} is not loaded: model.ppo.init_kl_coef=0 uses no "
                       "reference")
        return None
    return reference_model


def old_logprobs_from_update(
    ppo: PPOSettings, n_groups: int, fast: bool, critic: bool, dropout: bool,
) -> bool:
    """True where the old log-probs can come from the update's own forward instead of a scoring pass.

    Needed: a scoring pass to skip (not ``fast``); the update's forward sees the weights the rollout saw (one
    epoch, one mini-batch of all ``n_groups`` rows) in the same mode (no ``dropout``); nothing else read from that
    pass (no value head: GAE needs the old values; the exact KL needs the current logits beside the reference's);
    and the advantages do not need the log-probs before the update (no KL penalty in the reward)."""
    kl_in_reward = ppo.uses_reference and not ppo.kl_in_loss
    full_kl = ppo.uses_reference and ppo.kl_estimator == "full"
    return (not fast and ppo.ppo_epochs == 1 and n_groups == 1 and not critic and not dropout
            and not kl_in_reward and not full_kl)


def check_environment_strategy(environment: object | None, trainer: object) -> None:
    """Refuses an environment under sharded weights (fit, validate, test, predict): each process runs its own number
    of turns, and every forward of sharded weights is a collective of all processes."""
    if environment is not None and dist.weights_sharded(trainer):
        raise ValueError("model.environment runs a different number of turns on each process, which sharded "
                         "weights (FSDP, DeepSpeed ZeRO-3) cannot follow; use DDP or one device")


def environment_errors(environment: object | None, ppo: PPOSettings, model_name: str) -> list[str]:
    """What ``model.environment`` cannot be combined with (one line each, naming the flags)."""
    if environment is None:
        return []
    errors = []
    if is_encoder_decoder(model_name):
        errors.append(f"model.environment runs multi-turn conversations of a decoder-only chat model; "
                      f"model.model_name={model_name!r} is an encoder-decoder (seq2seq) model")
    if ppo.overlong != "none":
        errors.append(f"model.ppo.overlong={ppo.overlong!r} reads a single response's length against its limit; "
                      "with model.environment (several turns, each with its own limit) set model.ppo.overlong=none")
    return errors


def environment_notice(fast_rollout: bool) -> str:
    """Said once, at the first rollout with ``model.environment``."""
    notice = ("model.environment: each turn re-reads its whole conversation (generate: the exact path, no KV cache "
              "across turns); the log-probs come from a teacher-forced pass over the whole conversation")
    return notice + ("; model.fast_rollout's sampled log-probs are not used" if fast_rollout else "")
