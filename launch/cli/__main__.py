"""``python -m launch.cli``: what a cluster job runs, where the ``lpreg`` script may not exist."""

import sys

from launch.cli.main import main

sys.exit(main())
