"""A plain Python function given by its import path as the reward, as TRL's ``reward_funcs``."""

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

from lit_rlhf.rewards.base import NonFiniteRewardError, Reward


def import_function(path: str, setting: str = "function") -> Callable[..., Any]:
    """The function named by ``module:function`` (a module on the Python path or in the current directory) or
    ``path/to/file.py:function``; errors name ``setting`` and what is wrong, in one line."""
    module_name, _, attribute = path.rpartition(":")
    if not module_name or not attribute:
        raise ValueError(f"{setting}={path!r} must be 'module:function' (as my_rewards:exact_answer) or "
                         "'path/to/file.py:function'")
    try:
        module = _import_module(module_name)
    except ModuleNotFoundError as err:
        raise ValueError(f"{setting}={path!r}: no module named {err.name!r} on the Python path or in the current "
                         f"directory {os.getcwd()} (or give 'path/to/file.py:function')") from err
    except FileNotFoundError as err:
        raise ValueError(f"{setting}={path!r}: no such file {module_name!r}") from err
    except Exception as err:  # the user's module failed while importing
        raise ValueError(f"{setting}={path!r}: importing {module_name!r} failed: {type(err).__name__}: {err}") from err
    function = getattr(module, attribute, None)
    if function is None or not callable(function):
        what = "has no attribute" if function is None else "has a non-callable"
        raise ValueError(f"{setting}={path!r}: module {module_name!r} {what} {attribute!r}")
    return function


def _import_module(name: str) -> Any:
    if name.endswith(".py"):
        file = os.path.abspath(os.path.expanduser(name))
        if not os.path.isfile(file):
            raise FileNotFoundError(file)
        module_name = f"lit_rlhf_user_rewards.{os.path.splitext(os.path.basename(file))[0]}"
        spec = importlib.util.spec_from_file_location(module_name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # so that its functions pickle by reference
        spec.loader.exec_module(module)
        return module
    # A console script's path does not hold the current directory (python -m does): add it, last, so that a
    # user's my_rewards.py beside the config imports and never shadows an installed package.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    return importlib.import_module(name)


class RewardFunctionError(ValueError):
    """A user's reward function raised: one line naming the reward, the exception and where it was raised
    (``FunctionReward(my_rewards:parse_int) raised ValueError: ... (my_rewards.py:22)``). The original exception is
    its ``__cause__``, so ``LIT_RLHF_DEBUG=1`` shows the whole traceback. A ValueError, whatever the user's code
    raised, so that the commands print it as one line as they do every user error."""

    def __init__(self, reward: str, error: BaseException, function: Callable[..., Any]) -> None:
        message = " ".join(str(error).split()) or "(no message)"
        super().__init__(f"{reward} raised {type(error).__name__}: {message} ({raised_at(error, function)})")


def raised_at(error: BaseException, function: Callable[..., Any]) -> str:
    """``file.py:line`` of the innermost frame of ``error``'s traceback in the file that defines ``function`` (the
    user's own line, not the library call inside it that raised), else of its innermost frame."""
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    home = getattr(getattr(function, "__code__", None), "co_filename", None)
    own = [f for f in frames if f.filename == home]
    frame = (own or frames or [None])[-1]
    return "unknown location" if frame is None else f"{os.path.basename(frame.filename)}:{frame.lineno}"


class FunctionReward(Reward):
    """A plain Python function as the reward, as TRL's ``reward_funcs``:
    ``fn(prompts, responses, **columns) -> list[float]``, one float per response.

    ``columns`` are the batch's source columns by name (one value per response: e.g. ``answer``); a function with
    ``**kwargs`` gets them all, one without gets those it names. A rule-based reward in a few lines::

        def exact_answer(prompts, responses, answer, **kwargs):
            return [1.0 if r.strip().startswith(str(a)) else 0.0 for r, a in zip(responses, answer)]

    used as ``reward: {class_path: lit_rlhf.rewards.FunctionReward, init_args: {function: my_rewards:exact_answer}}``,
    alone or inside ``CompositeReward``.
    """

    takes_columns = True

    def __init__(self, function: str, columns: list[str] | None = None, name: str | None = None) -> None:
        """
        Args:
            function: Import path of the function: ``module:function`` (a module on the Python path or in the
                current directory, e.g. ``my_rewards:exact_answer``) or ``path/to/file.py:function``.
            columns: The data columns the function needs, checked against the data before the first step.
                None: the keyword parameters it declares without a default (after ``prompts, responses``).
            name: The reward's name in metrics (``env/reward/<name>_mean`` inside a ``CompositeReward``); None:
                the function's name.
        """
        super().__init__()
        self.function = function
        self.fn = import_function(function, self.flag("function"))
        self._signature = _function_parameters(self.fn, function, self.flag("function"))
        self.columns = list(columns) if columns is not None else self._signature[1]
        self._name = name

    def __getstate__(self) -> dict[str, Any]:
        # the function travels by its import path (a file-loaded module is not importable by name elsewhere)
        return {k: v for k, v in self.__dict__.items() if k != "fn"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.fn = import_function(self.function, self.flag("function"))

    @property
    def name(self) -> str:
        return self._name or getattr(self.fn, "__name__", "function")

    def describe(self) -> str:
        return f"FunctionReward({self.function})"

    def required_columns(self) -> list[str]:
        return list(self.columns)

    def compute(
        self, prompts: list[str], responses: list[str], references: list[str] | None,
        columns: dict[str, list[Any]] | None = None,
    ) -> torch.Tensor:
        columns = columns or {}
        missing = [c for c in self.columns if c not in columns]
        if missing:
            raise ValueError(f"{self.describe()} reads the column(s) {missing}, which the batch lacks (its columns: "
                             f"{sorted(columns)}); add them to the data or change the reward")
        takes_all, named = self._signature[0], self._signature[2]
        kwargs = columns if takes_all else {k: v for k, v in columns.items() if k in named}
        try:
            out = self.fn(prompts, responses, **kwargs)
        except Exception as err:  # any type: the user's code failed; say whose code and where, in one line
            raise RewardFunctionError(self.describe(), err, self.fn) from err
        return self._as_scores(out, len(responses))

    def _as_scores(self, out: Any, n: int) -> torch.Tensor:
        """The function's return value as float64 [n]; a clear error otherwise."""
        if isinstance(out, (str, bytes, Mapping)) or not hasattr(out, "__len__"):
            raise TypeError(f"{self.describe()} returned {type(out).__name__}; return a list of floats, one per response")
        if len(out) != n:
            raise ValueError(f"{self.describe()} returned {len(out)} scores for {n} responses; return one per response")
        try:
            scores = torch.as_tensor([float(x) for x in out], dtype=torch.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{self.describe()} returned a value that is not a number ({err})") from err
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        if bad:
            raise NonFiniteRewardError(f"{self.describe()} returned non-finite scores at positions {bad}: "
                                       f"{[float(scores[i]) for i in bad[:10]]}")
        return scores


def _function_parameters(fn: Callable[..., Any], path: str, flag: str) -> tuple[bool, list[str], set[str]]:
    """(takes ``**kwargs``, the columns it needs (keyword parameters without default), every parameter name)."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True, [], set()
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in parameters):
        raise ValueError(f"{flag}={path!r} must take (prompts, responses, **columns); its "
                         f"signature is {inspect.signature(fn)}")
    rest = [p for p in parameters[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_all = any(p.kind == p.VAR_KEYWORD for p in parameters)
    needed = [p.name for p in rest if p.default is p.empty]
    return takes_all, needed, {p.name for p in rest}
