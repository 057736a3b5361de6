"""``python -m ntkscrub <subcommand>``: the same as the ``ntkscrub`` console script."""

import sys

from ntkscrub.cli import main

sys.exit(main())
