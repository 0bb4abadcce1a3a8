-- Sub-transaction barrier table for MySQL 8 / MariaDB (dtmcli; the Go client's layout, except the
-- collation). {collation} is binary and NO PAD, so gids such as 'Order-x' / 'order-x', 'x' / 'x '
-- and 'é' / 'e' are different transactions; utf8mb4's default (case-insensitive) collation would
-- make them share barrier rows and skip the second one's business effect.
-- MySQL 8: utf8mb4_0900_bin (`python -m dtmcli.sql ddl mysql`); MariaDB: utf8mb4_nopad_bin
-- (`python -m dtmcli.sql ddl mariadb`). Migrating an existing table (one statement):
--   ALTER TABLE {schema}.{table} CONVERT TO CHARACTER SET utf8mb4 COLLATE {collation};
CREATE DATABASE IF NOT EXISTS {schema} DEFAULT CHARACTER SET utf8mb4;
CREATE TABLE IF NOT EXISTS {schema}.{table} (
  id bigint NOT NULL AUTO_INCREMENT,
  trans_type varchar(45) NOT NULL DEFAULT '',
  gid varchar(128) NOT NULL DEFAULT '',
  branch_id varchar(128) NOT NULL DEFAULT '',
  op varchar(45) NOT NULL DEFAULT '',
  barrier_id varchar(45) NOT NULL DEFAULT '',
  reason varchar(45) NOT NULL DEFAULT '' COMMENT 'the op that inserted this row',
  create_time datetime DEFAULT now(),
  update_time datetime DEFAULT now(),
  PRIMARY KEY (id),
  UNIQUE KEY uniq_{table} (gid, branch_id, op, barrier_id),
  KEY create_time (create_time),
  KEY update_time (update_time)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = {collation};
