"""Optional-dependency imports that fail loudly, shared by the model-backed reward plugins.

Importing this module imports nothing beyond the standard library, so every plugin can use it without pulling in
another plugin's dependencies.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

# Errors that a broken optional stack raises at import time: a missing module (ImportError), a CUDA torchvision
# wheel beside a CPU torch ("operator torchvision::nms does not exist", RuntimeError), a missing shared library.
IMPORT_FAILURES = (ImportError, RuntimeError, OSError, AttributeError)


def require(module: str, reward: str, pip_line: str, hint: str = "") -> ModuleType:
    """Import ``module`` for the reward ``reward``, or raise an ImportError that names the fix.

    Args:
        module: dotted module name to import.
        reward: the registered reward name (for the message).
        pip_line: the exact command that installs what is missing (``pip install ...``).
        hint: an extra sentence appended to the message.

    Raises:
        ImportError: the import failed for any reason in :data:`IMPORT_FAILURES`; the message contains
            ``pip_line`` verbatim and the original error, which is chained as ``__cause__``.
    """
    try:
        return importlib.import_module(module)
    except IMPORT_FAILURES as e:
        msg = f"reward {reward!r} needs the module {module!r}, which cannot be imported ({type(e).__name__}: {e}). " \
              f"Install it with: {pip_line}"
        raise ImportError(msg + (f"\n{hint}" if hint else "")) from e


def flowrl_source_hint() -> str:
    """Where flowrl's source tree is, for install instructions: this checkout when running from one, else a
    placeholder."""
    root = Path(__file__).resolve().parent.parent
    return str(root) if (root / "pyproject.toml").is_file() and (root / "flowrl").is_dir() else "<flowrl checkout>"


def remote_route(reward: str, venv: str, pip_line: str, port: int, args: str = "") -> str:
    """Instructions for running ``reward`` from its own virtual environment behind :mod:`flowrl.reward_server`
    and pointing training at it with ``reward=remote`` (a reward whose pins clash with the training environment)."""
    src = flowrl_source_hint()
    return (
        f"Steps: create the environment, install flowrl and the reward there, serve the reward with flowrl's reward "
        f"server:\n"
        f"  python -m venv {venv}\n"
        f"  {venv}/bin/pip install {src}\n"
        f"  {venv}/bin/{pip_line}\n"
        f"  {venv}/bin/python -m flowrl.reward_server --reward {reward} --port {port}{args}\n"
        f"and train with: reward=remote reward.args.url=http://127.0.0.1:{port}"
    )
