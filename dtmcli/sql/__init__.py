"""Barrier DDL templates and Lua scripts shipped with dtmcli; ``python -m dtmcli.sql ddl mariadb`` prints the DDL.

The ``*.sql`` / ``*.js`` files are templates: ``{schema}``, ``{table}`` (and ``{collation}`` for
MySQL) are filled from validated identifiers by :func:`dtmcli.barrier.ddl`.
"""
