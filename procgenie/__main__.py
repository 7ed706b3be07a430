"""`python -m procgenie` runs the command line (and `torchrun -m procgenie train ...` trains with DDP)."""

import sys

from procgenie.cli import main

sys.exit(main())
