"""Barrier DDL and Lua scripts shipped with dtmcli; ``python -m dtmcli.sql ddl mysql`` prints the DDL."""
