"""Lightning callbacks that measure a lit_rlhf run (importable as ``lit_rlhf.callbacks``)."""
