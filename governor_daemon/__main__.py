"""`python -m governor_daemon` is the `governor` command."""

import sys

from governor_daemon.cli.main import main

sys.exit(main())
