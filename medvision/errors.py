"""The one root of every error medvision raises for a user to read.

A :class:`MedvisionError` is a failure of input or setting, not of medvision: its message is one line
that names the file, the recipe key or the value at fault and what was expected. The CLI prints it as
``medvision <command>: error: <message>`` and exits 2, never with a traceback. Each layer defines its own
subclass (``RecipeError``, ``DataSourceError``, ``RunError``, ...) next to the code that raises it, so that
callers can catch one kind; anything else that escapes is a bug, and the CLI says so in one line too
(``MEDVISION_DEBUG=1`` shows its traceback).

The subclasses keep the built-in class they always had (``ValueError``, ``OSError``, ``RuntimeError``), so
code that caught those still does.
"""

from __future__ import annotations


class MedvisionError(Exception):
    """A user-facing failure whose message names the file, key or value at fault."""


class ExportError(MedvisionError, RuntimeError):
    """An export that cannot be made or fails its checks (nothing was written), or an exported model
    that cannot be loaded. The message says why and names the file."""


class EnvironmentProblem(MedvisionError, RuntimeError):
    """The machine cannot do what was asked (no CUDA device, a missing optional package, a rendezvous that
    failed); the message names the setting or the package to install."""
