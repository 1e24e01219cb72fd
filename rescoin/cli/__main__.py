"""``python -m rescoin.cli ...``: the same as the ``rescoin`` command."""
import sys

from rescoin.cli import main

sys.exit(main())
