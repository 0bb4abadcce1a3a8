// Sub-transaction barrier collection for MongoDB (dtmcli; same layout as the Go client's).
// Barrier calls use multi-document transactions, so the server must be a replica set or mongos.
db = db.getSiblingDB("dtm_barrier");
db.barrier.createIndex({ gid: 1, branch_id: 1, op: 1, barrier_id: 1 }, { unique: true });
