"""``python -m dtmcli.sql ddl {mysql,mariadb,postgres,mongo} [--table schema.name]``: print the barrier DDL.

``mysql`` is MySQL 8 (key collation utf8mb4_0900_bin), ``mariadb`` MariaDB (utf8mb4_nopad_bin).
"""

import sys

from ..barrier import main

sys.exit(main())
