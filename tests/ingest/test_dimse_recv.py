"""The DIMSE listener's PDU reads: one buffer per PDU, whatever pieces the network delivers it in."""

from __future__ import annotations

import socket
import threading

from gateway.ingest.dimse import _recv_exactly


def _send_in_pieces(sock: socket.socket, data: bytes, piece: int, close: bool) -> threading.Thread:
    def send() -> None:
        for i in range(0, len(data), piece):
            sock.sendall(data[i : i + piece])
        if close:
            sock.close()

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_a_pdu_sent_in_small_pieces_is_read_whole() -> None:
    data = bytes(range(256)) * 2048  # 512 KiB
    a, b = socket.socketpair()
    with a, b:
        sender = _send_in_pieces(a, data + b"next", 1000, close=False)
        assert _recv_exactly(b, len(data)) == data
        sender.join()
        assert _recv_exactly(b, 4) == b"next"  # nothing past the requested length was consumed


def test_a_peer_closing_early_gives_what_arrived() -> None:
    a, b = socket.socketpair()
    with b:
        sender = _send_in_pieces(a, b"x" * 5000, 777, close=True)
        assert _recv_exactly(b, 10_000) == b"x" * 5000
        sender.join()
