"""The coordinator's request stream (DeadlineReader) reads as a buffered socket file does, over a real socket pair."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from dtmcli.testing._reader import DeadlineReader, RequestTimeout


def reader_with(data: bytes, close: bool = True) -> tuple[DeadlineReader, socket.socket, socket.socket]:
    server, client = socket.socketpair()
    client.sendall(data)
    if close:
        client.shutdown(socket.SHUT_WR)
    reader = DeadlineReader(server)
    reader.next_request(2.0)
    return reader, server, client


def test_lines_limits_and_end_of_stream() -> None:
    reader, server, client = reader_with(b"GET / HTTP/1.1\r\nlonger-than-limit\r\nrest")
    try:
        assert reader.readline() == b"GET / HTTP/1.1\r\n"
        assert reader.readline(6) == b"longer"
        assert reader.readline() == b"-than-limit\r\n"
        assert reader.read(2) == b"re"
        assert reader.readline() == b"st"  # the stream ended without a newline
        assert reader.readline() == b"" and reader.read(5) == b""
    finally:
        server.close()
        client.close()


def drip(client: socket.socket, data: bytes, gap: float) -> threading.Thread:
    def send() -> None:
        try:
            for byte in data:
                client.sendall(bytes([byte]))
                time.sleep(gap)
        except OSError:
            pass

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_read_all_and_large_reads() -> None:
    body = bytes(range(256)) * 8192  # 2 MiB, more than one receive
    server, client = socket.socketpair()
    reader = DeadlineReader(server)
    reader.next_request(5.0)
    sender = threading.Thread(target=lambda: (client.sendall(body + b"tail"), client.shutdown(socket.SHUT_WR)))
    sender.start()
    try:
        assert reader.read(len(body)) == body
        assert reader.read() == b"tail"
    finally:
        sender.join()
        server.close()
        client.close()


def test_deadline_counts_from_the_first_byte_not_per_receive() -> None:
    server, client = socket.socketpair()
    reader = DeadlineReader(server)
    reader.next_request(0.3)
    time.sleep(0.4)  # idle before the request: no limit yet
    started = time.monotonic()
    sender = drip(client, b"GET /api/ping HTTP/1.1", gap=0.05)  # each gap far below the timeout
    try:
        with pytest.raises(RequestTimeout):
            reader.readline()
        assert 0.25 < time.monotonic() - started < 1.0
    finally:
        server.close()
        client.close()
        sender.join()
