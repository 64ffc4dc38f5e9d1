"""What a command parses before LightningCLI reads it: packaged configs by name, the config to start from (the
packaged default, or the run folder of ``--ckpt_path``), and which subcommand parsers the arguments need."""

from __future__ import annotations

import sys
import textwrap
from importlib import resources
from pathlib import Path
from typing import Iterable

from lit_rlhf.runtime import run_folder_of

SUBCOMMANDS = ("fit", "validate", "test", "predict")
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")
"""``--ckpt_path`` values that Lightning resolves itself (not a file)."""
SUBCOMMANDS_WITH_DEFAULT = ("fit", "validate", "test")
"""The subcommands that run the packaged default config when given neither ``--config`` nor ``--ckpt_path``."""


DEFAULT_CONFIG = "detox_summarizer.yaml"
"""The packaged config ``fit``/``validate``/``test`` use when no ``--config`` is given."""


def config_path(name: str = DEFAULT_CONFIG) -> str:
    """Absolute path of a packaged config (``lit_rlhf/configs/<name>``; default: :data:`DEFAULT_CONFIG`)."""
    return str(resources.files("lit_rlhf.configs").joinpath(name))


CONFIG_PREFIXES = (("lit_rlhf", "configs"), ("configs",))
"""How a packaged config may be spelled in front of its name: as in the repository, or as installed."""


def packaged_configs() -> list[str]:
    """The names of the packaged configs (``embedded_t5.yaml``, ``strategy/ddp.yaml``, ...), sorted: top level
    first, then each sub-folder."""
    root = resources.files("lit_rlhf.configs")
    names = [entry.name for entry in root.iterdir() if entry.name.endswith(".yaml")]
    for folder in (e for e in root.iterdir() if e.is_dir() and not e.name.startswith("_")):
        names += [f"{folder.name}/{entry.name}" for entry in folder.iterdir() if entry.name.endswith(".yaml")]
    return sorted(names, key=lambda n: (n.count("/"), n))


def config_catalogue() -> str:
    """The packaged configs, for ``--help``: the top-level ones, then one folder (overlays) a paragraph."""
    folders: dict[str, list[str]] = {}
    for name in packaged_configs():
        folders.setdefault(name.rpartition("/")[0], []).append(name)
    lines = "".join("\n" + textwrap.fill("  ".join(names), 116, initial_indent="  ", subsequent_indent="  ")
                    for names in folders.values())
    return f"\n\nPackaged configs (--config NAME or configs/NAME from any folder; an existing file comes first):{lines}"


def resolve_config(value: str) -> str:
    """A ``--config`` value as jsonargparse should read it: a file that exists, as given; otherwise the packaged
    config of that name (``embedded_grpo.yaml``, ``configs/embedded_grpo.yaml``, ``strategy/ddp.yaml``), so the
    repository's commands work from any folder with an installed lit_rlhf. A YAML name that is neither: a
    ValueError listing the packaged ones. Anything else (an inline YAML string) as given."""
    path = Path(value).expanduser()
    if not value.endswith((".yaml", ".yml")) or path.exists() or path.is_absolute():
        return value
    parts = path.parts
    for prefix in CONFIG_PREFIXES:
        if parts[:len(prefix)] == prefix:
            parts = parts[len(prefix):]
            break
    name = "/".join(parts)
    if name in packaged_configs():
        return config_path(name)
    raise ValueError(f"--config {value}: no such file, and no packaged config of that name (packaged: "
                     f"{', '.join(packaged_configs())})")


def resolve_configs(args: list[str]) -> list[str]:
    """``args`` with each ``--config``/``-c`` value resolved by :func:`resolve_config`."""
    resolved = list(args)
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            resolved[i + 1] = resolve_config(args[i + 1])
        elif arg.startswith("--config="):
            resolved[i] = "--config=" + resolve_config(arg[len("--config="):])
    return resolved


def with_default_config(args: list[str], default: bool = True) -> list[str]:
    """Insert a config after the subcommand when the user gave none: with ``--ckpt_path`` of a file, the run's
    own ``config.yaml`` (:func:`run_config_of`), for every subcommand; otherwise (with ``default``)
    :data:`DEFAULT_CONFIG` for ``fit``, ``validate`` and ``test``. The flags given still override it."""
    if not args or any(a in ("-c", "--config") or a.startswith("--config=") for a in args):
        return args
    ckpt_path = flag_value(args, "--ckpt_path")
    if ckpt_path is not None and ckpt_path not in LIGHTNING_CKPT_NAMES and args[0] in SUBCOMMANDS:
        return [args[0], "--config", str(run_config_of(ckpt_path)), *args[1:]]
    if not default or args[0] not in SUBCOMMANDS_WITH_DEFAULT:
        return args
    return [args[0], "--config", config_path(), *args[1:]]


def needed_subcommands(args: list[str], subcommands: Iterable[str]) -> set[str]:
    """The subcommands whose full parser ``args`` need: the one given (the first argument that is not an option
    of the main parser: ``--config FILE``, ``--print_config``); none for the main ``--help``; all otherwise (a
    config file may name it)."""
    known, i = set(subcommands), 0
    while i < len(args):
        arg = args[i]
        if arg in known:
            return {arg}
        if not arg.startswith("-"):
            break
        i += 2 if arg in ("-c", "--config") else 1
    return set() if any(a in ("-h", "--help") for a in args) and i >= len(args) else known


def flag_value(args: list[str], flag: str) -> str | None:
    """The value of the last ``flag VALUE`` or ``flag=VALUE`` in ``args`` (None when absent)."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return value


def run_config_of(ckpt_path: str) -> Path:
    """The ``config.yaml`` of the run that wrote ``ckpt_path`` (``<run dir>/checkpoints/<file>.ckpt``), which
    a command given only ``--ckpt_path`` starts from; a ValueError asking for ``--config`` when there is none."""
    if not Path(ckpt_path).is_file():
        raise ValueError(f"--ckpt_path {ckpt_path}: no such file")
    folder = run_folder_of(ckpt_path)
    config = folder.path / "config.yaml" if folder is not None else None
    if config is None or not config.is_file():
        where = f"no {config}" if config is not None else "it is not in a run folder (<run dir>/checkpoints/)"
        raise ValueError(f"--ckpt_path {ckpt_path}: {where}, the run's settings to start from; give them with "
                         f"--config FILE")
    return config


def command_args(args: list[str] | None, default: bool) -> list[str] | None:
    """What every command parses: ``args`` (None: the command line) with packaged config names resolved
    (:func:`resolve_configs`) and the config to start from inserted where none is given
    (:func:`with_default_config`; ``default``: the packaged default too). From the command line ``sys.argv`` is
    rewritten and None returned: LightningCLI reads it itself (and warns when given both)."""
    prepared = with_default_config(resolve_configs(sys.argv[1:] if args is None else list(args)), default)
    if args is None:
        sys.argv[1:] = prepared
        return None
    return prepared
