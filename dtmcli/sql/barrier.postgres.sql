-- Sub-transaction barrier table for PostgreSQL (dtmcli; same layout as the Go client's).
-- The barrier's insert names the key columns in ON CONFLICT, not this constraint, so any table
-- name works; the columns use the database's default (deterministic) collation.
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE SEQUENCE IF NOT EXISTS {schema}.{table}_seq;
CREATE TABLE IF NOT EXISTS {schema}.{table} (
  id bigint NOT NULL DEFAULT nextval('{schema}.{table}_seq'),
  trans_type varchar(45) NOT NULL DEFAULT '',
  gid varchar(128) NOT NULL DEFAULT '',
  branch_id varchar(128) NOT NULL DEFAULT '',
  op varchar(45) NOT NULL DEFAULT '',
  barrier_id varchar(45) NOT NULL DEFAULT '',
  reason varchar(45) NOT NULL DEFAULT '',
  create_time timestamp(0) with time zone DEFAULT now(),
  update_time timestamp(0) with time zone DEFAULT now(),
  PRIMARY KEY (id),
  CONSTRAINT uniq_{table} UNIQUE (gid, branch_id, op, barrier_id)
);
CREATE INDEX IF NOT EXISTS {table}_create_time ON {schema}.{table} (create_time);
CREATE INDEX IF NOT EXISTS {table}_update_time ON {schema}.{table} (update_time);
