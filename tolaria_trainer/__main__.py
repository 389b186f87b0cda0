"""`python -m tolaria_trainer` is `tolaria-train`."""

import sys

from tolaria_trainer.cli import main

sys.exit(main())
