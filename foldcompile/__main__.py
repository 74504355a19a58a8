"""``python -m foldcompile`` is the ``foldcompile`` command."""
import sys

from foldcompile.cli import main

sys.exit(main())
