"""``python -m vq_tasks.cli``: the same as ``vq-backup``."""

import sys

from vq_tasks.cli.main import main

sys.exit(main())
