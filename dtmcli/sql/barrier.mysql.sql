-- Sub-transaction barrier table for MySQL / MariaDB (dtmcli; same layout as the Go client's).
CREATE DATABASE IF NOT EXISTS dtm_barrier DEFAULT CHARACTER SET utf8mb4;
CREATE TABLE IF NOT EXISTS dtm_barrier.barrier (
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
  UNIQUE KEY uniq_barrier (gid, branch_id, op, barrier_id),
  KEY create_time (create_time),
  KEY update_time (update_time)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
