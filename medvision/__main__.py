"""``python -m medvision``, which ``torchrun -m medvision ...`` runs on every rank."""

import sys

from medvision.cli import main

if __name__ == "__main__":
    sys.exit(main())
