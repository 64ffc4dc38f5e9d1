"""Run folders and resuming, for the command line: which run a checkpoint belongs to, which model settings the
user gave on the command line, and how those combine with the settings a checkpoint stores.

A run folder is TensorBoard's ``<save_dir>/<name>/<version>/`` (``logs/lightning_logs/version_0``); Lightning's
ModelCheckpoint writes into its ``checkpoints/`` sub-folder. A command given ``--ckpt_path`` of such a file
(resume, ``test``, ``validate``) writes its events, reports and adapter back into that folder.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LINK_TARGETS = ("rollout_batch_size",)
"""Model settings set from another section by a link (``data.batch_size``): never compared or restored."""


@dataclass(frozen=True)
class RunFolder:
    """Where a TensorBoard logger writes: ``save_dir/name/version`` (``version_N`` for an integer version)."""

    save_dir: str
    name: str
    version: int | str

    @property
    def path(self) -> Path:
        version = f"version_{self.version}" if isinstance(self.version, int) else self.version
        return Path(self.save_dir, self.name, version)


def run_folder_of(ckpt_path: str | Path, checkpoint_dirs: Sequence[str] = ()) -> RunFolder | None:
    """The run folder of ``.../<name>/<version>/checkpoints/<file>.ckpt``; None for a file elsewhere.

    checkpoint_dirs: the ``dirpath`` values the checkpoint's ModelCheckpoint states hold. When one of them is
    this file's folder, spelled differently (relative, say), the run folder is spelled like it: ModelCheckpoint
    then recognises its own folder and keeps writing ``last.ckpt`` rather than a new ``last-v1.ckpt``."""
    folder = Path(ckpt_path).absolute().parent
    if folder.name != "checkpoints":
        return None
    same = [Path(d) for d in checkpoint_dirs if Path(d).name == "checkpoints" and Path(d).resolve() == folder.resolve()]
    if same and len(same[0].parts) >= 4:
        folder = same[0]
    version_dir = folder.parent
    match = re.fullmatch(r"version_(\d+)", version_dir.name)
    version = int(match.group(1)) if match else version_dir.name
    return RunFolder(str(version_dir.parent.parent), version_dir.parent.name, version)


def given_model_keys(args: Sequence[str]) -> list[str]:
    """Dotted keys under ``model`` that command-line flags set: ``--model.ppo_steps 105`` -> ``ppo_steps``,
    ``--model.generation.top_p=0.9`` -> ``generation.top_p``. A whole ``--model`` (a config file) gives ``*``."""
    keys = []
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag == "--model":
            keys.append("*")
        elif flag.startswith("--model."):
            keys.append(flag[len("--model."):])
    return keys


def is_given(key: str, given: Sequence[str]) -> bool:
    """Whether a flag in ``given`` sets ``key``: the key itself, a group above it, or ``*``."""
    return any(g == "*" or key == g or key.startswith(g + ".") for g in given)


def plain_values(value: Any) -> Any:
    """Tuples as lists, recursively (dicts too), so that a checkpoint's ``(16, 48)`` equals a config's
    ``[16, 48]``."""
    if isinstance(value, dict):
        return {k: plain_values(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [plain_values(v) for v in value]
    return value


def combine_with_checkpoint(parsed, stored, given: Sequence[str], report_kept: bool = True):
    """The model settings a resumed run uses, and one notice per setting where the two sources differ.

    parsed: the model section as parsed from the config and flags (jsonargparse Namespace); stored: the same
    with the checkpoint's hyperparameters merged over it. Settings the user gave as flags keep their parsed
    value; every other setting takes the checkpoint's, so that a resumed run continues the run it resumes.
    report_kept: also give a notice for each setting the checkpoint keeps (useful when resuming a fit; noise
    for ``test``/``validate``, which measure the checkpoint as it is). Returns (the combined Namespace, notices)."""
    combined = stored.clone()
    notices = []
    for key in sorted(set(parsed.keys()) | set(stored.keys())):
        if key.split(".")[0] in LINK_TARGETS:
            continue
        mine, theirs = parsed.get(key), stored.get(key)
        if plain_values(mine) == plain_values(theirs):
            continue
        if is_given(key, given):
            combined[key] = mine
            notices.append(f"model.{key}={plain_values(mine)!r} (given) replaces the checkpoint's {plain_values(theirs)!r}")
        elif report_kept:
            notices.append(
                f"model.{key}={plain_values(theirs)!r} comes from the checkpoint (the config says {plain_values(mine)!r}; "
                f"give --model.{key} to change it)"
            )
    return combined, notices


def remove_if_only_start_files(folder: Path) -> bool:
    """Delete a run folder that a failed start created, unless it holds a checkpoint (work worth keeping).

    Returns whether it was removed."""
    if not folder.is_dir() or any(folder.rglob("*.ckpt")):
        return False
    shutil.rmtree(folder)
    return True
