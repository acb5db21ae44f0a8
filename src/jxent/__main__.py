"""``python -m jxent``: the same as the ``jxent`` command."""

from jxent._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
