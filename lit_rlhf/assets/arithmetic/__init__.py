"""The embedded arithmetic model: a small GPT-2 trained by lit-rlhf-sft, stopped early (see PROVENANCE.md)."""
