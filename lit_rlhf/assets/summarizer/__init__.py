"""The embedded summarizer: a small T5 trained by lit-rlhf-sft (see PROVENANCE.md)."""
