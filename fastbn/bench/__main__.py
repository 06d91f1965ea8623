"""``python -m fastbn.bench``: the ``fastbn-bench`` command."""

from . import main

raise SystemExit(main())
