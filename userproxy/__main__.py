"""``python -m userproxy`` is the ``userproxy`` command."""

from __future__ import annotations

import sys

from userproxy.cli import main

sys.exit(main())
