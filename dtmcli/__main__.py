"""``python -m dtmcli``: the ``dtmcli`` command line (see :mod:`dtmcli.cli`)."""

from .cli import main

raise SystemExit(main())
