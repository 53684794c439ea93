"""The ``kubenode-exporter`` command: ``serve`` (the default), ``desired`` and ``diff``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from exporter import __version__
from exporter.config import ConfigError, Option, Settings, load_file, option_table, resolve
from exporter.logs import setup_logging

log = logging.getLogger("exporter")

SUBCOMMANDS = ("serve", "desired", "diff")


def _collector_defaults() -> dict[str, bool]:
    from exporter.collector import load_collectors

    return {name: cls.default_enabled for name, cls in load_collectors().items()}


def collector_option_table() -> dict[str, Option]:
    """Every option, with those the collectors declare beside themselves."""
    from exporter.collector import load_collectors

    collectors = load_collectors()
    options = [opt for cls in collectors.values() for opt in cls.options]
    aliases = {old: name for name, cls in collectors.items() for old in cls.old_names}
    return option_table(_collector_defaults(), options, aliases)


def _help_text(opt: Option) -> str:
    """The option's help with its default; '%' escaped, since argparse formats help."""
    text = opt.help
    if opt.parse.__name__ == "_as_bool":
        text += " (default on)" if opt.default else " (default off)"
    elif opt.default not in (None, "", []) and "default" not in text:
        text += f" (default {opt.default})"
    return text.replace("%", "%%")


def _add_option(parser: argparse.ArgumentParser, opt: Option) -> None:
    flag = "--" + opt.key
    if opt.parse.__name__ == "_as_bool":
        parser.add_argument(flag, dest=opt.key, action=argparse.BooleanOptionalAction,
                            default=argparse.SUPPRESS, help=_help_text(opt))
    elif opt.repeat:
        parser.add_argument(flag, dest=opt.key, action="append", default=argparse.SUPPRESS,
                            metavar=opt.metavar, help=_help_text(opt))
    else:
        parser.add_argument(flag, dest=opt.key, default=argparse.SUPPRESS, metavar=opt.metavar,
                            help=_help_text(opt))


def serve_parser(table: dict[str, Option]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubenode-exporter",
        description="Per-node Prometheus exporter: IPVS drift against Services/EndpointSlices, "
                    "ipset fill, proxy sync, kubelet/proxy CPU, memory cgroups. "
                    "Subcommands: serve (default), desired, diff.",
    )
    parser.add_argument("--version", action="version", version=f"kubenode-exporter {__version__}")
    parser.add_argument("--config.file", dest="config.file", metavar="PATH", default=None,
                        help="YAML config; every flag has a key of the same name; flags win")
    for opt in table.values():
        if opt.flag:
            _add_option(parser, opt)
    return parser


def settings_from_args(argv: list[str]) -> Settings:
    table = collector_option_table()
    args = vars(serve_parser(table).parse_args(argv))
    config_path = args.pop("config.file", None)
    file_values = load_file(config_path) if config_path else {}
    return resolve(table, file_values, args)


def serve(argv: list[str]) -> int:
    try:
        settings = settings_from_args(argv)
    except ConfigError as err:
        print(f"kubenode-exporter: {err}", file=sys.stderr)
        return 2
    setup_logging(settings["log.level"], settings["log.format"])

    from exporter import allocator
    from exporter.collector import Context, Runner, build_collectors
    from exporter.http import MetricsServer, make_app
    from exporter.paths import Paths

    # Before any thread starts: glibc makes arenas per thread (exporter/allocator.py says what it saves).
    allocator.tune()

    # Every input is checked before anything starts (collectors start watches and threads).
    web = None
    if settings["web.config.file"]:
        from exporter.webconfig import read_web_config

        try:
            web = read_web_config(settings["web.config.file"])
        except ConfigError as err:
            print(f"kubenode-exporter: {err}", file=sys.stderr)
            return 2
    ctx = Context(settings=settings, paths=Paths(settings["path.procfs"], settings["path.sysfs"]))
    runner = Runner(build_collectors(ctx), timeout=settings["scrape.timeout"])
    try:
        app = make_app(runner, settings["web.telemetry-path"],
                       auth=web.authenticator() if web else None, headers=web.headers if web else ())
        server = MetricsServer(app, settings["web.listen-address"], web.ssl_context() if web else None,
                               web.tls.client_allowed_sans if web and web.tls else ())
    except (OSError, ValueError, ConfigError) as err:
        print(f"kubenode-exporter: cannot serve on {settings['web.listen-address']}: {err}", file=sys.stderr)
        runner.close()
        ctx.close()
        return 2

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    log.info("serving on %s%s, collectors: %s", settings["web.listen-address"], settings["web.telemetry-path"],
             ", ".join(c.name for c in runner.collectors) or "none")
    stop.wait()
    log.info("shutting down")
    server.stop()
    runner.close()
    ctx.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "serve"
    if argv and argv[0] in SUBCOMMANDS:
        command = argv.pop(0)
    if command == "serve":
        return serve(argv)
    from exporter import offline

    return offline.main(command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
