"""Where the modules of lit_rlhf 0.3's flat layout live now, so that what named them keeps working.

Run folders written by lit_rlhf 0.3 name classes by those modules in their ``config.yaml`` (``class_path:
lit_rlhf.prompts.PromptDataModule``) and so may users' configs and scripts. :data:`MOVED_MODULES` maps each old
module to the package that exports its public names now; importing an old module gives a stand-in that reads
every attribute from there (with one ``FutureWarning`` naming the new place), so ``--ckpt_path`` of an old run
resumes it and an old config still runs. The config a run writes names the new paths.
"""

import importlib
import importlib.abc
import importlib.util
import pkgutil
import sys
import warnings
from types import ModuleType
from typing import Any

MOVED_MODULES = {
    "lit_rlhf.module": "lit_rlhf.modules",
    "lit_rlhf.sft": "lit_rlhf.modules",
    "lit_rlhf.dpo": "lit_rlhf.modules",
    "lit_rlhf.reward_model": "lit_rlhf.modules",
    "lit_rlhf.prompts": "lit_rlhf.data",
    "lit_rlhf.preferences": "lit_rlhf.data",
    "lit_rlhf.sampled_pairs": "lit_rlhf.data.sampled_pairs",
    "lit_rlhf.sources": "lit_rlhf.data",
    "lit_rlhf.policy": "lit_rlhf.models",
    "lit_rlhf.lm": "lit_rlhf.models",
    "lit_rlhf.decoding": "lit_rlhf.models",
    "lit_rlhf.tiny": "lit_rlhf.models",
    "lit_rlhf.ppo": "lit_rlhf.objectives",
    **{f"lit_rlhf.{name}": "lit_rlhf.runtime" for name in (
        "distributed", "io", "checkpoint", "runs", "threads", "progress", "guards", "health")},
}
"""lit_rlhf 0.3's module -> the package that exports its public names now (``lit_rlhf.data.sampled_pairs``, a
command, moved whole). ``lit_rlhf.data`` and ``lit_rlhf.rewards``, modules then, are packages of the same name now
and need no entry."""


def moved_attribute(old: str, name: str) -> Any:
    """``name`` of lit_rlhf 0.3's module ``old``, from where it lives now: the new package's exports, else the
    file of that package that defines it, else :mod:`lit_rlhf.settings` (settings classes that old modules
    imported); an ``AttributeError`` naming the new place when it is gone."""
    new = MOVED_MODULES[old]
    module = importlib.import_module(new)
    if hasattr(module, name):
        return getattr(module, name)
    if not name.startswith("__"):
        places = [f"{new}.{info.name}" for info in pkgutil.iter_modules(getattr(module, "__path__", []))]
        for place in [*places, "lit_rlhf.settings"]:
            found = vars(importlib.import_module(place))
            if name in found:
                return found[name]
    raise AttributeError(f"module {old!r} has no attribute {name!r} (lit_rlhf 0.4 moved it to {new})")


def moved_warning(old: str) -> None:
    warnings.warn(f"{old} is now {MOVED_MODULES[old]} (lit_rlhf 0.4's layout): write {MOVED_MODULES[old]}.<name>",
                  FutureWarning, stacklevel=3)


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module of :data:`MOVED_MODULES` as a stand-in whose attributes are read where they live
    now (:func:`moved_attribute`); ``python -m`` of an old module runs the new one."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec) -> None:
        return None  # the default module; exec_module makes it read the new places

    def exec_module(self, module: ModuleType) -> None:
        old = module.__name__
        moved_warning(old)
        module.__getattr__ = lambda name: moved_attribute(old, name)
        module.__doc__ = f"Moved: {MOVED_MODULES[old]}."

    def get_code(self, fullname: str):
        """The new module's code, for ``python -m`` (runpy) of an old module that was a command."""
        moved_warning(fullname)
        new = MOVED_MODULES[fullname]
        return importlib.util.find_spec(new).loader.get_code(new)

    def is_package(self, fullname: str) -> bool:
        return False


def current_class_path(class_path: str) -> str:
    """``lit_rlhf.prompts.PromptDataModule`` -> ``lit_rlhf.data.PromptDataModule`` where the new package exports
    the name; any other path unchanged (an old path still resolves through its stand-in)."""
    module, _, name = class_path.rpartition(".")
    if module not in MOVED_MODULES or not hasattr(importlib.import_module(MOVED_MODULES[module]), name):
        return class_path
    return f"{MOVED_MODULES[module]}.{name}"


def with_current_class_paths(config: Any) -> Any:
    """Rewrite, in place, every ``class_path`` of a parsed config (namespaces, dicts and lists, nested) that
    names an old module: the config a run writes names today's paths. Returns ``config``."""
    items = vars(config) if hasattr(config, "__dict__") else config
    if isinstance(items, dict):
        for key, value in items.items():
            if key == "class_path" and isinstance(value, str):
                items[key] = current_class_path(value)
            else:
                with_current_class_paths(value)
    elif isinstance(items, list):
        for value in items:
            with_current_class_paths(value)
    return config


def install() -> None:
    """Put the finder after the regular ones (an old module exists as no file), once."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
