"""``python -m workbench``: the ``workbench`` command, which ``torchrun -m workbench`` runs on every rank."""
import sys

from .cli import main

sys.exit(main())
