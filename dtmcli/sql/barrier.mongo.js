// Sub-transaction barrier collection for MongoDB (dtmcli; same layout as the Go client's). EXPERIMENTAL.
// Barrier calls use multi-document transactions, so the server must be a replica set or mongos.
db = db.getSiblingDB("{schema}");
db.{table}.createIndex({ gid: 1, branch_id: 1, op: 1, barrier_id: 1 }, { unique: true });
