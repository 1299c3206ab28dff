"""``python -m genzoo`` is the ``genzoo`` command."""

import sys

from genzoo.cli import main

sys.exit(main())
