"""A DTM stand-in that answers every request at once with 200 {"dtm_result":"SUCCESS"}.

Runs in its own process so the client's CPU is measured alone. HTTP/1.1 keep-alive, TCP_NODELAY, each
answer in one send.
Usage: python _sink.py PORT_FILE  (writes the chosen port to PORT_FILE, serves until killed)
"""

from __future__ import annotations

import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BODY = b'{"dtm_result":"SUCCESS"}'
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.wfile.write(ANSWER)  # head and body in one send, as DTM's Go server writes a small answer

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    with open(sys.argv[1], "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()
