"""medvision: transfer learning on medical images from YAML recipes."""

import os

# albumentations checks PyPI for a newer version on every import unless told not to.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
