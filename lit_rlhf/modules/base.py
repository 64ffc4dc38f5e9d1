"""What the LightningModules share: building the policy in ``configure_model``."""

from lit_rlhf.models import build_policy


class BuildsPolicy:
    """LightningModule mixin: the :class:`Policy` described by ``self.policy_kwargs`` is built in
    ``configure_model``, once per process, inside the strategy's init context (where FSDP and DeepSpeed ZeRO-3
    create sharded or meta-device weights) and before a checkpoint's weights are loaded; a second call builds
    nothing. Each call also sets torch's CPU threads for the policy's size (``model.num_threads``). Code that
    uses ``self.policy`` outside a Trainer (scripts, tests) gets it built on first use. The host sets
    ``policy_kwargs`` and has ``hparams.dtype`` and ``hparams.num_threads``; ``weight_dtype`` is the dtype
    ``model.dtype`` resolved to."""

    def configure_model(self) -> None:
        from lit_rlhf.runtime import use_num_threads

        if "policy" not in self._modules:
            self._build_policy()
        # in every process, after launch; also when the policy was built earlier
        use_num_threads(self.hparams.num_threads, self.policy, self._trainer)

    def _build_policy(self) -> None:
        """The policy, in the base dtype ``model.dtype`` resolves to on the run's device."""
        device = getattr(getattr(self._trainer, "strategy", None), "root_device", None)  # None: no trainer yet
        self.policy, self.weight_dtype = build_policy(self.policy_kwargs, self.hparams.dtype, device)
        self.policy.train(self.training)  # the module's mode, also when it was set before the build

    def __getattr__(self, name: str):
        if name == "policy" and "policy" not in self.__dict__.get("_modules", {}) and "policy_kwargs" in self.__dict__:
            self._build_policy()
        return super().__getattr__(name)
