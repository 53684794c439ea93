"""Settings: one table of options, read from flags and from a YAML file.

Every option has a dotted key (``web.listen-address``) that is both its flag
(``--web.listen-address``) and its key in the config file. The file may nest
keys (``web: {listen-address: ...}``) or write them dotted; both flatten to the
same key. Flags win over the file, the file wins over defaults. Unknown keys and
values of the wrong type are a ``ConfigError`` with a one-line reason.
"""

from __future__ import annotations

import ipaddress
import math
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from exporter.yamlload import YAMLInputError, decode_utf8, load_all

DEFAULT_LISTEN_ADDRESS = ":9815"
PROXIES = ("kube-proxy", "kube-router")
# kube-proxy's --proxy-mode values, and ours: find the node's mode (exporter/proxymode.py).
PROXY_MODES = ("auto", "ipvs", "nftables", "iptables")
# Seconds a collector's run may take before a scrape answers without it. Prometheus'
# default scrape_timeout is 10 s; 8 s leaves 2 s to write and send the page (21.5 ms
# for the largest measured, 2,000 ipsets, README Benchmarks) and for the network, and
# still covers the slowest healthy run measured (a process's first read of a 10,000-
# service IPVS table, 2.1 s in the emulated VM).
DEFAULT_SCRAPE_TIMEOUT = 8.0
LOG_FORMATS = ("logfmt", "json")


class ConfigError(Exception):
    """A setting is wrong; the message is shown to the user as it is."""


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError("must be true or false")


def _as_str(value: Any) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError("must be a string")


def _as_seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a number of seconds")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError("must be a number of seconds") from None
    if not math.isfinite(seconds):  # nan compares false with everything; inf never expires
        raise ValueError("must be a finite number of seconds")
    if seconds < 0:
        raise ValueError("must not be negative")
    if seconds > threading.TIMEOUT_MAX:  # the longest wait Python's sockets and locks accept (292 years)
        raise ValueError(f"must be at most {threading.TIMEOUT_MAX:.0f} seconds")
    return seconds


def _as_deadline(value: Any) -> float:
    seconds = _as_seconds(value)
    if not 0 < seconds < float("inf"):
        raise ValueError("must be a positive, finite number of seconds")
    return seconds


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str]:
    """A parser of a string that must be one of ``choices``."""
    def parse(value: Any) -> str:
        text = _as_str(value)
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text
    return parse


def _as_count(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("must be a whole number")
    if isinstance(value, float):  # YAML's 1000.0, .inf, .nan
        if not value.is_integer():
            raise ValueError("must be a whole number")
        value = int(value)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError("must be a whole number") from None
    if number < 0:
        raise ValueError("must be a whole number, not negative")
    return number


def _as_str_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError("must be a list of strings")


def _as_cidr_list(value: Any) -> list[str]:
    items = _as_str_list(value)
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"must be CIDRs ({item!r} is not one)") from None
    return items


def _as_cluster_cidrs(value: Any) -> list[str]:
    items = _as_cidr_list(value)
    if not 1 <= len(items) <= 2:
        raise ValueError("must be one or two CIDRs (one per family)")
    return items


def _as_http_url(value: Any) -> str:
    from exporter.readers.proxymetrics import check_url  # the reader's own rule of what it can fetch

    text = _as_str(value)
    try:
        check_url(text)
    except ValueError as err:
        raise ValueError(f"is not usable: {err}") from None
    return text


def _as_regex(value: Any) -> str:
    text = _as_str(value)
    try:
        re.compile(text)
    except re.error as err:
        raise ValueError(f"is not a valid regular expression ({err})") from None
    return text


def _as_log_level(value: Any) -> str:
    text = _as_str(value).lower()
    if text not in ("debug", "info", "warn", "warning", "error"):
        raise ValueError("must be one of debug, info, warn, error")
    return text


def _as_components(value: Any) -> list[dict[str, str]]:
    """Process components: ``[{name: kubelet, match: '^kubelet$'}, ...]``.

    ``match`` is a regex tried on the process name, then on the command line.
    """
    if not isinstance(value, list):
        raise ValueError("must be a list of {name, match}")
    out = []
    for item in value:
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError("each component needs a string 'name'")
        unknown = set(item) - {"name", "match"}
        if unknown:
            raise ValueError(f"unknown component key(s): {', '.join(sorted(unknown))}")
        match = item.get("match", "^" + re.escape(item["name"]) + "$")
        out.append({"name": item["name"], "match": _as_regex(match)})
    return out


@dataclass(frozen=True)
class Option:
    key: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    metavar: str | None = None
    repeat: bool = False  # flag may be given more than once (a list)
    flag: bool = True  # also a command-line flag (structured values are file-only)
    alias_of: str | None = None  # another name of that option (an old name, the contract's spelling)


OPTIONS: list[Option] = [
    Option("web.listen-address", _as_str, DEFAULT_LISTEN_ADDRESS,
           "address to serve /metrics on, HOST:PORT", "HOST:PORT"),
    Option("web.telemetry-path", _as_str, "/metrics", "path of the metrics page", "PATH"),
    Option("web.config.file", _as_str, None,
           "exporter-toolkit web config (TLS, basic auth)", "PATH"),
    Option("kubeconfig", _as_str, None,
           "kubeconfig for API access; else $KUBECONFIG, else in-cluster", "PATH"),
    Option("node-name", _as_str, None, "this node's name (default $NODE_NAME, then the host name)", "NAME"),
    Option("node-ip", _as_str_list, [],
           "address NodePort virtual servers are expected on (repeatable; default: this host's addresses)",
           "IP", repeat=True),
    Option("proxy", _one_of(PROXIES), "kube-proxy", "whose IPVS rules to expect: kube-proxy or kube-router", "PROXY"),
    Option("proxy-mode", _one_of(PROXY_MODES), "auto",
           "the dataplane the proxy programs: ipvs, nftables, iptables, or auto (ask kube-proxy's "
           "GET /proxyMode on the proxy.metrics-url address, else look at which tables exist; "
           "kube-router is IPVS only)", "MODE"),
    Option("proxy_mode", _one_of(PROXY_MODES), None, "the contract's spelling of proxy-mode (config file)",
           flag=False, alias_of="proxy-mode"),
    # kube-router's own flags of these names, when it does not run with their defaults
    # (exporter/kube/desired.py KubeRouterFlags): which externalIPs / LoadBalancer IPs it programs.
    Option("kube-router.strict-external-ip-validation", _as_bool, True,
           "kube-router's flag of that name (its default since 2.8): only externalIPs and LoadBalancer IPs "
           "inside the ranges below are expected; with no range, none"),
    Option("kube-router.service-external-ip-range", _as_cidr_list, [],
           "kube-router's --service-external-ip-range (repeatable)", "CIDR", repeat=True),
    Option("kube-router.loadbalancer-ip-range", _as_cidr_list, [],
           "kube-router's --loadbalancer-ip-range (repeatable)", "CIDR", repeat=True),
    Option("kube-router.service-cluster-ip-range", _as_cluster_cidrs, ["10.96.0.0/12"],
           "kube-router's --service-cluster-ip-range (repeatable, one per family): externalIPs and "
           "LoadBalancer IPs inside it are refused under strict validation", "CIDR", repeat=True),
    Option("path.procfs", _as_str, "/proc", "procfs mountpoint", "PATH"),
    Option("path.sysfs", _as_str, "/sys", "sysfs mountpoint", "PATH"),
    Option("log.level", _as_log_level, "info", "debug, info, warn or error", "LEVEL"),
    Option("log.format", _one_of(LOG_FORMATS), "logfmt", "logfmt or json (one record a line)", "FORMAT"),
    Option("scrape.timeout", _as_deadline, DEFAULT_SCRAPE_TIMEOUT,
           "seconds each collector's run may take; past it the scrape answers without it "
           "(success 0, the reason) and the run goes on alone, not restarted until it returns "
           "(default 8: under Prometheus' default scrape_timeout of 10 s)", "SECONDS"),
    Option("memcg.paths", _as_str_list, [],
           "extra memory cgroups (relative to the memory hierarchy root) whose memory.stat is timed",
           "PATH", repeat=True),
    Option("process.components", _as_components,
           [{"name": "kubelet", "match": "^kubelet$"},
            {"name": "kube-proxy", "match": "^kube-proxy$"},
            {"name": "kube-router", "match": "^kube-router$"}],
           "processes to account (config file only)", flag=False),
    Option("ipset.include", _as_regex, "", "only sets whose name matches (default all)", "REGEX"),
    Option("ipset.exclude", _as_regex, "", "skip sets whose name matches", "REGEX"),
    Option("proxy.metrics-url", _as_http_url, None,
           "the proxy's own metrics page (default for kube-proxy http://127.0.0.1:10249/metrics; "
           "kube-router has none: it serves metrics only when run with --metrics-port)", "URL"),
    Option("proxy.timeout", _as_seconds, 2.0, "timeout reading the proxy's metrics page", "SECONDS"),
    Option("proxy.max-bytes", _as_count, 8 * 1024 * 1024,
           "largest proxy metrics page read; a larger one is an error", "BYTES"),
]

# Collectors add their ``collector.<name>`` option when they register.
COLLECTOR_PREFIX = "collector."


def option_table(collector_defaults: dict[str, bool], collector_options: Iterable[Option] = (),
                 collector_aliases: dict[str, str] | None = None) -> dict[str, Option]:
    """Every option: the table above, the options collectors declare beside themselves
    (``Collector.options``), ``collector.<name>`` per collector and per old name of one."""
    table = {opt.key: opt for opt in OPTIONS}
    for opt in collector_options:
        if opt.key in table and table[opt.key] is not opt:
            raise RuntimeError(f"option {opt.key!r} declared twice")
        table[opt.key] = opt
    for name, enabled in sorted(collector_defaults.items()):
        key = COLLECTOR_PREFIX + name
        table[key] = Option(key, _as_bool, enabled, f"enable the {name} collector")
    for old, name in sorted((collector_aliases or {}).items()):
        key = COLLECTOR_PREFIX + old
        table[key] = Option(key, _as_bool, None, f"old name of --collector.{name}",
                            alias_of=COLLECTOR_PREFIX + name)
    return table


@dataclass
class Settings:
    """Resolved settings; ``get('web.listen-address')``."""

    values: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str) -> Any:
        return self.values[key]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def collector_enabled(self, name: str) -> bool:
        return bool(self.values.get(COLLECTOR_PREFIX + name, False))


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """``{'web': {'listen-address': x}}`` -> ``{'web.listen-address': x}``.

    Descends only into mappings whose dotted path is not itself a known key
    prefix-terminal; lists and scalars are leaves.
    """
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise ConfigError(f"config key {key!r} is not a string")
        dotted = prefix + key
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def read_yaml(path: str, what: str) -> Any:
    """One YAML document from ``path`` (None when empty); a ConfigError naming ``what`` and the line."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as err:
        raise ConfigError(f"{what} {path}: cannot read it: {err.strerror}") from None
    try:
        docs = load_all(decode_utf8(raw))
    except YAMLInputError as err:
        raise ConfigError(f"{what} {path}: {err}") from None
    if len(docs) > 1:
        raise ConfigError(f"{what} {path}: holds {len(docs)} YAML documents, expected one")
    return docs[0] if docs else None


def load_file(path: str) -> dict[str, Any]:
    data = read_yaml(path, "config file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of keys to values")
    return flatten(data)


def resolve(table: dict[str, Option], file_values: dict[str, Any],
            flag_values: dict[str, Any], source: str = "config file") -> Settings:
    """Defaults, then the file, then flags; each value parsed by its option."""
    values = {key: opt.default for key, opt in table.items() if opt.alias_of is None}
    for origin, given in ((source, file_values), ("flag", flag_values)):
        # An option's own name wins over another name of it given in the same place.
        for key, raw in sorted(given.items(), key=lambda kv: table.get(kv[0]) is None
                               or table[kv[0]].alias_of is None):
            opt = table.get(key)
            if opt is None:
                hint = _closest(key, table)
                raise ConfigError(f"unknown {origin} key {key!r}" + (f" (did you mean {hint!r}?)" if hint else ""))
            try:
                values[opt.alias_of or key] = opt.parse(raw)
            except ValueError as err:
                raise ConfigError(f"{origin} key {key!r}: {raw!r} {err}") from None
    return Settings(values)


def _closest(key: str, table: dict[str, Option]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(key, list(table), n=1)
    return matches[0] if matches else None
