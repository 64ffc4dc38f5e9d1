"""Files that are either complete or absent, and the random-number states that make a resume exact.

* :func:`atomic_write`: a file written into a temporary sibling, flushed to disk and renamed over the target
  (on POSIX the rename is atomic: readers see the old file or the new one, never half of one).
* :func:`atomic_directory`: a folder built in a temporary sibling and swapped in (an adapter export, an
  embedded model build); with ``replace=False`` the first complete build wins (several processes may build
  the same folder at once).
* :func:`rng_state` / :func:`set_rng_state`: torch (CPU and every CUDA device), Python and NumPy generators,
  as plain types and tensors, so a checkpoint holding them loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn


def current_umask() -> int:
    """The process's file-creation mask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[BinaryIO], None]) -> Path:
    """Write ``content`` (text, bytes, or a function that writes into a binary file) to ``path`` atomically.

    The data goes to a temporary sibling file, is flushed and fsynced, gets the permissions ``open`` would
    give it, and is renamed over ``path``. A crash at any point leaves the previous file (or none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_directory(target: str | os.PathLike, write: Callable[[Path], None], replace: bool = True) -> bool:
    """Run ``write(folder)`` into a temporary sibling of ``target``, then move the folder into place.

    ``replace=True``: an existing ``target`` is swapped out (renamed aside, then removed), so a crash leaves
    either the old or the new folder complete (in the instant between the two renames, the old one under
    ``<target>.old``). ``replace=False``: if ``target`` already exists (another process finished first), the
    new build is discarded. Returns whether this call's folder was moved into place.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private (0700)
        if not target.exists():
            try:
                os.rename(tmp, target)
                return True
            except OSError:
                if not (target.exists() and not replace):
                    raise
        if not replace:
            return False  # another process's complete build is in place
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """Every global random-number state a run samples from: torch CPU, torch CUDA (each device, when CUDA is
    initialised), Python, NumPy. On a GPU, sampling draws from the CUDA generator, so without its state a
    resumed run would sample differently."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned. A CUDA state is restored when this process has CUDA (a GPU
    checkpoint resumed on the CPU keeps its CPU stream and ignores the CUDA one).

    A checkpoint from another number of CUDA devices (8 GPUs resumed on 4) restores the devices both have,
    0 .. min - 1, and warns (on rank zero) that the resumed run samples differently from an uninterrupted one."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        here = torch.cuda.device_count()
        if len(cuda) != here:
            rank_zero_warn(
                f"The checkpoint holds the CUDA random states of {len(cuda)} devices, this process sees {here}: "
                f"restoring those of devices 0-{min(len(cuda), here) - 1} only, so the resumed run is not bit-exact "
                "(it samples differently from an uninterrupted one). Resume with as many visible GPUs "
                "(CUDA_VISIBLE_DEVICES) as the run that saved it for an exact resume."
            )
        torch.cuda.set_rng_state_all(cuda[:here])
