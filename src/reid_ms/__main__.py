"""``python -m reid_ms``: the ``reid-ms`` command."""

import sys

from reid_ms.cli import main

sys.exit(main())
