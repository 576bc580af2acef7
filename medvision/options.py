"""The values a command's options share with the library: limits, timeouts, choices, exit codes and ``--shard``.

Each is defined here once, and the library's functions take them as their defaults. This module imports
nothing heavy, so the command line shows its help and rejects a mistyped option at once, without loading
torch, timm and scikit-learn (5-6 s on 2 cores): it imports a task only once the command is understood.
"""

from __future__ import annotations

#: Default ``--max-pixels``: values one decoded frame may hold (about 1 GiB as float32), e.g. 16k x 16k RGB.
MAX_PIXELS = 1 << 28
#: Default ``--max-file-size``: bytes; a larger file is an error row, never read into memory.
MAX_FILE_BYTES = 4 << 30

#: Default ``--file-timeout``: seconds one file may take to read and preprocess in its worker.
FILE_TIMEOUT = 300.0
#: Default ``--slide-timeout``: seconds one slide may take to open and find its tissue.
SLIDE_TIMEOUT = 600.0

#: ``score --amp`` and ``features --amp`` choices: the precision of the PyTorch engine (ONNX Runtime always runs
#: its float32 graph).
SCORE_AMP = ("none", "auto", "bf16", "fp16")

#: ``export --format`` choices.
EXPORT_FORMATS = ("onnx", "monai-bundle")

#: Exit codes of ``medvision score`` and ``medvision features`` (documented on their pages of the docs; a model
#: that cannot be loaded is a user error, 2, as for every command).
EXIT_OK, EXIT_FILE_ERRORS, EXIT_NO_IMAGES = 0, 3, 4


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` with 0 <= i < n.

    Raises:
        ValueError: anything else; the message names the value and the form expected.
    """
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: need 0 <= i < n")
    return i, n
