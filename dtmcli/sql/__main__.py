"""``python -m dtmcli.sql ddl {mysql,postgres,mongo} [--table schema.name]``: print the barrier DDL."""

import sys

from ..barrier import main

sys.exit(main())
