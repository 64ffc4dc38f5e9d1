"""Preference pairs for DialogSum made by lit_rlhf (``bundled:dialogsum-pairs``; see PROVENANCE.md)."""
