"""Fetch and parse a proxy's own Prometheus metrics page (kube-proxy, kube-router).

Plain data only; turning it into kubenode_proxy_* families is the collector's job.

Fetching is bounded in time and size: one monotonic deadline covers the
exchange from connect to the last byte. Every receive on the socket, whether
http.client is after the status line, a header, a chunk-size line or body bytes,
is allowed only the time left, so a peer that drips a byte just often enough to
keep each receive alive still ends at the deadline. The body is read in pieces
that stop as soon as the size cap is passed, so a stalled or huge page never
holds a scrape or memory for long. A refused connection (nothing listening) is told apart from
every other failure, because "the proxy is not serving metrics" is a fact about
the proxy, while "it answered something unusable" is a failure of this read.

Parsing keeps only the families asked for. Every line must have the shape of
the Prometheus text format (a comment, a blank line or ``name{labels} value``),
so an HTML page or random bytes is rejected; lines of other families are not
looked into further. The families asked for are parsed strictly: a declared
type other than the one expected, a label block that does not parse, or a value
that is not a number makes the whole page unusable, since carrying half of a
histogram would be worse than carrying none.
"""

from __future__ import annotations

import http.client
import io
import math
import re
import socket
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from exporter import lookup

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs

READ_PIECE = 64 * 1024


class ProxyNotListening(Exception):
    """Nothing accepts connections at the metrics address (connection refused)."""


class PageUnusable(Exception):
    """The address answered, but not with a usable metrics page; the message is one line."""


# -- fetching ---------------------------------------------------------------


def check_url(url: str) -> urllib.parse.SplitResult:
    """Validate a metrics URL (plain http only); ValueError with the reason."""
    if not url.isascii() or any(c.isspace() for c in url):
        raise ValueError(f"metrics URL {url!r} must be plain ASCII without spaces (percent-encode the rest)")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"metrics URL {url!r} must start with http://")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError(f"metrics URL {url!r} has a bad port") from None
    if not parts.hostname:
        raise ValueError(f"metrics URL {url!r} has no host")
    return parts


class _Deadline:
    """One monotonic deadline for a whole exchange, and which part of it is under way."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.phase = "connecting"

    def remaining(self) -> float:
        """Seconds left; past the deadline, ``PageUnusable`` saying where it ran out."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise self.passed()
        return left

    def passed(self) -> PageUnusable:
        return PageUnusable(f"no complete answer within {self.seconds:g} s (proxy.timeout): "
                            f"timed out {self.phase}")


class _DeadlineReader(io.RawIOBase):
    """The socket's incoming bytes, each receive given only the time left.

    http.client reads lines (status, headers, chunk sizes) through a buffered
    file; a socket timeout set once before such a read would apply to each of
    its receives anew. Setting it here, per receive, keeps the one deadline.
    """

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)  # counted by the socket, so closing stays in order
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self._sock.settimeout(self._deadline.remaining())
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineSocket:
    """The part of a socket http.client uses (sendall, makefile, close), under one deadline."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        self._sock = sock
        self._deadline = deadline

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(self._deadline.remaining())
        self._sock.sendall(data)

    def makefile(self, mode: str = "rb", *args, **kwargs) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))

    def close(self) -> None:
        self._sock.close()


class _DeadlineConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, deadline: _Deadline) -> None:
        super().__init__(host, port, timeout=deadline.seconds)
        self._deadline = deadline

    def connect(self) -> None:
        self._deadline.phase = f"looking up {self.host}"
        address = _lookup(self.host, self.port, self._deadline)
        self._deadline.phase = "connecting"
        sock = socket.create_connection(address, self._deadline.remaining())
        self.sock = _DeadlineSocket(sock, self._deadline)


def _lookup(host: str, port: int, deadline: _Deadline) -> tuple[str, int]:
    """(address, port) to connect to, within the deadline (exporter.lookup: getaddrinfo
    takes no timeout of its own)."""
    try:
        entries = lookup.addresses(host, port, deadline.remaining())
    except lookup.LookupTimedOut:
        raise deadline.passed() from None
    except OSError as err:
        raise PageUnusable(f"cannot look up {host}: {err.strerror or err}") from None
    return entries[0][4][0], port


def fetch_page(url: str, timeout: float, max_bytes: int) -> bytes:
    """GET ``url`` and return the body, within ``timeout`` seconds and ``max_bytes``.

    Raises ``ProxyNotListening`` when the connection is refused, ``PageUnusable``
    for anything else that keeps a complete 200 answer from arriving in time.
    """
    parts = check_url(url)
    deadline = _Deadline(timeout)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn = _DeadlineConnection(parts.hostname, parts.port or 80, deadline)
    try:
        try:
            conn.connect()
        except ConnectionRefusedError:
            raise ProxyNotListening(f"nothing listens at {parts.netloc} (connection refused)") from None
        deadline.phase = "sending the request"
        # Ask for the text format: client_golang would otherwise pick protobuf or
        # OpenMetrics by negotiation, and gzip when allowed.
        conn.request("GET", path, headers={
            "Accept": "text/plain;version=0.0.4;q=1,*/*;q=0.1",
            "Accept-Encoding": "identity",
            "User-Agent": "kubenode-exporter",
        })
        deadline.phase = "reading the status line and headers"
        resp = conn.getresponse()
        if resp.status != 200:
            raise PageUnusable(f"HTTP {resp.status} {resp.reason}".rstrip())
        content_type = resp.getheader("Content-Type", "")
        if "protobuf" in content_type:
            raise PageUnusable(f"answered {content_type}, not the text format")
        encoding = resp.getheader("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise PageUnusable(f"answered with Content-Encoding {encoding} though asked for identity")
        length = resp.getheader("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > max_bytes:
            raise PageUnusable(f"page is {int(length)} bytes, over the {max_bytes}-byte cap (proxy.max-bytes)")
        deadline.phase = "reading the body"
        pieces: list[bytes] = []
        total = 0
        while True:
            piece = resp.read1(READ_PIECE)
            if not piece:
                break
            total += len(piece)
            if total > max_bytes:
                raise PageUnusable(f"page is over the {max_bytes}-byte cap (proxy.max-bytes)")
            pieces.append(piece)
        if resp.length:  # read1 ends quietly at EOF even when Content-Length promised more
            raise PageUnusable(f"connection closed mid-page, {resp.length} bytes short of its Content-Length")
        return b"".join(pieces)
    except (socket.timeout, TimeoutError):
        raise deadline.passed() from None
    except http.client.IncompleteRead as err:
        raise PageUnusable(f"connection closed mid-page ({len(err.partial)} bytes into a chunk)") from None
    except http.client.RemoteDisconnected:
        raise PageUnusable("connection closed without an answer") from None
    except http.client.HTTPException as err:
        raise PageUnusable(f"not a valid HTTP answer ({type(err).__name__})") from None
    except OSError as err:
        raise PageUnusable(f"reading {parts.netloc} failed: {err.strerror or err}") from None
    finally:
        conn.close()


# -- parsing ----------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    name: str  # the sample's own name, e.g. ..._bucket
    labels: Labels
    value: float


@dataclass
class Family:
    name: str
    type: str
    samples: list[Sample] = field(default_factory=list)


@dataclass(frozen=True)
class Histogram:
    """Cumulative buckets ``((upper bound, count), ...)`` ascending, ending at +Inf."""

    buckets: tuple[tuple[float, float], ...]
    sum: float

    @property
    def count(self) -> float:
        return self.buckets[-1][1]


# A line of some family we do not carry: only its outline is checked.
_LINE_SHAPE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?:\{.*\})?[ \t]+\S")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|Inf|inf)|NaN|nan")
_LABEL = re.compile(r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\\n]|\\.)*)"[ \t]*(,|\})')
_UNESCAPE = re.compile(r"\\(.)")
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}


def decode_page(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PageUnusable(f"page is not UTF-8 text (byte {err.start})") from None


def parse_families(text: str, wanted: Mapping[str, str]) -> dict[str, Family]:
    """The families named in ``wanted`` (name -> expected type) that the page has.

    A family the page does not have is simply absent from the result (a
    Go client omits a labelled family until its first observation).
    """
    # sample name -> family name, for every name a wanted family's samples may carry
    owner: dict[str, str] = {}
    for name, kind in wanted.items():
        owner[name] = name
        for suffix in _SUFFIXES.get(kind, ()):
            owner[name + suffix] = name
    prefixes = tuple(wanted)
    found: dict[str, Family] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line or line.isspace():
            continue
        if line[0] == "#":
            if line.startswith("# TYPE "):
                _read_type_line(line, number, wanted, found)
            continue
        if not _LINE_SHAPE.match(line):
            raise PageUnusable(f"line {number} is not in the Prometheus text format: {line[:60]!r}")
        if not line.startswith(prefixes):
            continue
        end = len(line)
        for stop in ("{", " ", "\t"):
            at = line.find(stop)
            if at != -1:
                end = min(end, at)
        family_name = owner.get(line[:end])
        if family_name is None:
            continue
        family = found.get(family_name)
        if family is None:
            raise PageUnusable(f"line {number}: {family_name} has samples but no TYPE line before them")
        family.samples.append(_parse_sample(line, end, number))
    return found


def _read_type_line(line: str, number: int, wanted: Mapping[str, str], found: dict[str, Family]) -> None:
    fields = line.split()
    if len(fields) != 4:
        if len(fields) >= 3 and fields[2] in wanted:
            raise PageUnusable(f"line {number}: malformed TYPE line for {fields[2]}")
        return
    name, kind = fields[2], fields[3]
    if name not in wanted:
        return
    if kind != wanted[name]:
        raise PageUnusable(f"{name} is a {kind} on this page, expected a {wanted[name]}")
    found.setdefault(name, Family(name, kind))


def _parse_sample(line: str, name_end: int, number: int) -> Sample:
    name = line[:name_end]
    pos = name_end
    labels: list[tuple[str, str]] = []
    if pos < len(line) and line[pos] == "{":
        pos += 1
        if line.startswith("}", pos):
            pos += 1
        else:
            while True:
                m = _LABEL.match(line, pos)
                if m is None:
                    raise PageUnusable(f"line {number}: bad label set in {name}")
                labels.append((m.group(1), _UNESCAPE.sub(_unescape, m.group(2))))
                pos = m.end()
                if m.group(3) == "}":
                    break
                # Go never writes a trailing comma, but the format allows one.
                if line.startswith("}", pos):
                    pos += 1
                    break
    rest = line[pos:].split()
    if not rest or len(rest) > 2:
        raise PageUnusable(f"line {number}: {name} has no value or extra fields")
    value = parse_number(rest[0])
    if value is None or (len(rest) == 2 and not rest[1].lstrip("-").isdigit()):
        raise PageUnusable(f"line {number}: {name} has a value that is not a number: {rest[0][:30]!r}")
    return Sample(name, tuple(sorted(labels)), value)


def _unescape(m: re.Match) -> str:
    return "\n" if m.group(1) == "n" else m.group(1)


def parse_number(text: str) -> float | None:
    if not _NUMBER.fullmatch(text):
        return None
    return float(text)


# -- shaping helpers (still plain data) ---------------------------------------


def histograms(family: Family) -> dict[Labels, Histogram]:
    """One ``Histogram`` per label set (``le`` aside), checked strictly.

    Every series needs an ``+Inf`` bucket, a ``_sum`` and a ``_count`` equal to
    the ``+Inf`` bucket; bounds must be distinct and counts cumulative. A page
    cut short or rewritten by hand fails here rather than giving wrong quantiles.
    """
    name = family.name
    buckets: dict[Labels, dict[float, float]] = {}
    sums: dict[Labels, float] = {}
    counts: dict[Labels, float] = {}
    for s in family.samples:
        if s.name == name + "_bucket":
            le = dict(s.labels).get("le")
            bound = parse_number(le) if le is not None else None
            if bound is None or math.isnan(bound):
                raise PageUnusable(f"{name}: bucket with a bad or missing le ({le!r})")
            key = tuple(p for p in s.labels if p[0] != "le")
            series = buckets.setdefault(key, {})
            if bound in series:
                raise PageUnusable(f"{name}: bucket le={le} twice")
            series[bound] = _count_value(name, s.value)
        elif s.name == name + "_sum":
            if math.isnan(s.value):
                raise PageUnusable(f"{name}: _sum is NaN")
            sums[s.labels] = s.value
        elif s.name == name + "_count":
            counts[s.labels] = _count_value(name, s.value)
        else:
            raise PageUnusable(f"{name}: unexpected sample {s.name}")
    out: dict[Labels, Histogram] = {}
    for key in set(buckets) | set(sums) | set(counts):
        where = f"{name}{_show(key)}"
        series = buckets.get(key)
        if not series or math.inf not in series:
            raise PageUnusable(f"{where}: histogram has no +Inf bucket (cut short?)")
        if key not in sums or key not in counts:
            raise PageUnusable(f"{where}: histogram has no _sum or _count (cut short?)")
        ordered = tuple(sorted(series.items()))
        for (_, lower), (bound, upper) in zip(ordered, ordered[1:]):
            if upper < lower:
                raise PageUnusable(f"{where}: bucket le={bound:g} holds fewer than the one below")
        if counts[key] != ordered[-1][1]:
            raise PageUnusable(f"{where}: _count {counts[key]:g} differs from the +Inf bucket {ordered[-1][1]:g}")
        out[key] = Histogram(ordered, sums[key])
    return out


def _count_value(name: str, value: float) -> float:
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise PageUnusable(f"{name}: a bucket or count of {value}")
    return value


def _show(labels: Labels) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""


def merge_histograms(name: str, parts: Iterable[Histogram]) -> Histogram | None:
    """Sum histograms of one family over their labels (e.g. kube-proxy's ip_family).

    They must share their bucket bounds, as series of one family always do.
    """
    parts = list(parts)
    if not parts:
        return None
    bounds = [b for b, _ in parts[0].buckets]
    for h in parts[1:]:
        if [b for b, _ in h.buckets] != bounds:
            raise PageUnusable(f"{name}: series with different buckets")
    counts = [sum(h.buckets[i][1] for h in parts) for i in range(len(bounds))]
    return Histogram(tuple(zip(bounds, counts)), sum(h.sum for h in parts))


def gauge_values(family: Family) -> dict[Labels, float]:
    return {s.labels: s.value for s in family.samples if s.name == family.name}
