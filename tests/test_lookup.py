"""exporter.lookup: name look-ups and connections inside one deadline."""

from __future__ import annotations

import socket

import pytest

from exporter import lookup


def _listening() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    return server


def test_each_address_the_resolver_gives_is_tried_in_turn(monkeypatch):
    """As socket.create_connection does: a name with an address that refuses and one that
    answers connects to the second."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: refuses
    server = _listening()
    entries = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", closed.getsockname()),
               (socket.AF_INET, socket.SOCK_STREAM, 6, "", server.getsockname())]
    real = socket.getaddrinfo
    monkeypatch.setattr(lookup.socket, "getaddrinfo",
                        lambda host, *a, **kw: entries if host == "two.invalid" else real(host, *a, **kw))
    try:
        sock = lookup.create_connection(("two.invalid", 1), 2.0)
        assert sock.getpeername() == server.getsockname() and sock.gettimeout() == 2.0
        sock.close()
        entries.pop()  # only the one that refuses: its error, not a timeout
        with pytest.raises(ConnectionRefusedError):
            lookup.create_connection(("two.invalid", 1), 2.0)
    finally:
        closed.close()
        server.close()


def test_a_literal_address_needs_no_lookup_thread(monkeypatch):
    server = _listening()
    started = []
    monkeypatch.setattr(lookup.threading, "Thread", lambda *a, **kw: started.append(a) or pytest.fail("a thread"))
    try:
        sock = lookup.create_connection(server.getsockname(), 2.0)
        sock.close()
        assert not started
    finally:
        server.close()


def test_a_name_the_resolver_refuses_is_its_error(monkeypatch):
    def refuse(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(lookup.socket, "getaddrinfo", refuse)
    with pytest.raises(socket.gaierror, match="not known"):
        lookup.addresses("name.invalid", 80, 10.0)
