"""``python -m jxent``: the same as the ``jxent`` command."""

from jxent._cli import main

raise SystemExit(main())
