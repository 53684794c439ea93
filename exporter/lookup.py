"""Name look-ups and connections with a deadline.

getaddrinfo takes no timeout: a dead DNS server holds it for resolv.conf's timeout times
its attempts times its servers (up to half a minute by default), and a socket timeout does
not cover it. A name is therefore looked up on a thread of its own that the caller stops
waiting for at its deadline; the thread ends when the resolver gives up. A literal
address is taken as it is, on the caller's thread.
"""

from __future__ import annotations

import socket
import threading
import time


class LookupTimedOut(TimeoutError):
    """The resolver gave no answer for a name within the deadline."""


def addresses(host: str, port: int, seconds: float) -> list[tuple]:
    """getaddrinfo's stream entries for ``host``, within ``seconds``: ``LookupTimedOut``
    past them, the resolver's own ``OSError`` (``socket.gaierror``) when it says no."""
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        pass  # a name, not an address
    answer: list = []

    def look() -> None:
        try:
            answer.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as err:
            answer.append(err)

    worker = threading.Thread(target=look, name=f"lookup {host}", daemon=True)
    worker.start()
    worker.join(max(seconds, 0.0))
    if not answer:
        raise LookupTimedOut(f"no answer looking up {host} within {seconds:g} s")
    if isinstance(answer[0], OSError):
        raise answer[0]
    return answer[0]


def create_connection(address: tuple[str, int], timeout: float, source_address=None) -> socket.socket:
    """``socket.create_connection`` with the name's look-up inside the same ``timeout``: each
    address the resolver gave is tried in turn with the time left; the socket returned
    has ``timeout`` set (the caller sets another for reads)."""
    host, port = address
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    for family, kind, proto, _, sockaddr in addresses(host, port, timeout):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(left)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            sock.settimeout(timeout)
            return sock
        except OSError as err:
            sock.close()
            last = err
    if last is not None:
        raise last
    raise TimeoutError(f"no connection to {host} within {timeout:g} s")
