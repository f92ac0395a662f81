"""``python -m model`` is the ``mldcn`` command."""

from model.cli import main

raise SystemExit(main())
