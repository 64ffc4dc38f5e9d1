"""The embedded tool model: a small GPT-2 that calls a calculator, trained by lit-rlhf-sft, stopped early (see PROVENANCE.md)."""
