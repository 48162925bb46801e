"""``python -m iwae``, and ``torchrun ... -m iwae``: the command line (``iwae.cli``)."""

import sys

from iwae.cli import main

sys.exit(main())
