"""Names and limits of the DTM wire protocol (see docs/protocol.md)."""

from __future__ import annotations

from typing import Final

DEFAULT_DTM: Final = "http://localhost:36789/api/dtmsvr"

# Global statuses; the last two are final.
PREPARED: Final = "prepared"
SUBMITTED: Final = "submitted"
ABORTING: Final = "aborting"
SUCCEED: Final = "succeed"
FAILED: Final = "failed"
FINAL_STATUSES: Final = frozenset({SUCCEED, FAILED})

# Transaction types.
SAGA: Final = "saga"
TCC: Final = "tcc"
XA: Final = "xa"
MSG: Final = "msg"
WORKFLOW: Final = "workflow"
TRANS_TYPES: Final = frozenset({SAGA, TCC, XA, MSG, WORKFLOW})

# Branch ops.
OP_ACTION: Final = "action"
OP_COMPENSATE: Final = "compensate"
OP_TRY: Final = "try"
OP_CONFIRM: Final = "confirm"
OP_CANCEL: Final = "cancel"
OP_COMMIT: Final = "commit"
OP_ROLLBACK: Final = "rollback"
OP_MSG: Final = "msg"

# Result words.
RESULT_SUCCESS: Final = "SUCCESS"
RESULT_FAILURE: Final = "FAILURE"
RESULT_ONGOING: Final = "ONGOING"

# Limits: gid is varchar(128) upstream; reason/custom_data columns are varchar(1024).
MAX_GID_LEN: Final = 128
MAX_BRANCH_ID_LEN: Final = 128
# Barrier table columns (dtmcli/sql/*.sql): gid and branch_id varchar(128) as above; op (and reason,
# which holds an op) varchar(45), as DTM's own trans_branch_op.op. A branch call whose op does not
# fit is refused when its query is parsed (400), never by the barrier's insert (500, retried forever).
MAX_OP_LEN: Final = 45
MAX_REASON_LEN: Final = 1023
MAX_CUSTOM_DATA_LEN: Final = 1024
# Branch URLs and query_prepared are varchar(1024) in every SQL store (sqls/dtmsvr.storage.*.sql).
MAX_URL_LEN: Final = 1024
# Integer options are int64 on the server (TransOptions, DtmTransOptions).
MAX_INT64: Final = 2**63 - 1
# Nested branch ids: at most 99 children a level, parent id shorter than 20 characters.
MAX_CHILDREN: Final = 99
MAX_PARENT_ID_LEN: Final = 20

# The msg query_prepared / barrier identity used by prepare_and_submit.
MSG_BRANCH_ID: Final = "00"
