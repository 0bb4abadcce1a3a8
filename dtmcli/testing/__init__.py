"""Test helpers: the in-process DTM-compatible coordinator and the pytest plugin.

- :class:`DtmTestServer`: a DTM-compatible coordinator (HTTP API, saga/tcc/xa/msg processing,
  retries on a manual or real clock, memory or SQLite state). A development and test tool, never a
  production server. ``python -m dtmcli.testing`` runs it from the command line.
- :class:`BranchService`: scripted HTTP branch services that record the calls they receive.
- :class:`DtmFacade`: the ``dtm`` fixture's interface, in process or against a real server.

Differences from DTM v1.19.0 (deliberate): resubmitting a ``submitted`` transaction runs one more
pass over the stored state (DTM re-runs branches rebuilt from the request, re-calling succeeded
saga actions and marking tcc/xa succeed without confirm); JSON-RPC and ``topic://``
steps are not supported (clear 500 errors); gRPC (the ``grpc`` extra, ``DtmTestServer(grpc_port=0)``)
has no PrepareWorkflow or topics, and its branch calls go out with grpcio's ``application/grpc``
content type (DTM's raw codec says ``application/grpc+dtm_raw``; the bytes are the same); a saga pass
waits for every branch call it sent (bounded by the request timeout) instead of leaving after
``RequestTimeout+2`` s; workflow registerBranch stores progress only with a non-empty ``sync``
or ``DtmTestServer(update_branch_sync=True)`` (a default DTM on boltdb stores nothing), and values longer
than DTM's SQL columns (1,024 characters, 64 KiB ``bin_data``) are refused as the SQL stores refuse them;
saga/msg ``custom_data`` is checked at submit (DTM stores it and fails
later); ``resetNextCronTime`` works (boltdb ignores it).

Limits (it answers or closes every request promptly): a request body is at most 8 MiB
(``Content-Length`` or the sum of the chunks; more is answered 413), a malformed ``Content-Length`` or
chunk size 400, a request not in full 30 s after its first byte (line, headers and body together;
an idle keep-alive connection has no limit) 408, another ``Transfer-Encoding`` 501; each of these
closes the connection. JSON nested deeper than Python's
recursion limit (about 1000 levels; Go allows 10000) is a decode error, answered like any other:
500 ``exceeded max depth`` on prepare/submit/abort, 400 on registerBranch, as DTM answers bad bodies.
Options are int64 as in DTM; due times are clamped so that no stored value breaks /query or /all
(times render between 1970 and 9999), a branch call waits at most a day, and unpaired UTF-16
surrogate escapes become U+FFFD as in Go.
"""

from .branch_service import Answer, BranchService, Call
from .facade import DtmFacade
from .server import DtmTestServer

__all__ = ["Answer", "BranchService", "Call", "DtmFacade", "DtmTestServer"]
