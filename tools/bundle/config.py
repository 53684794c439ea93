"""The bundle's one configuration: selectors, the node label, per-alert knobs.

Everything the rule and dashboard generators vary on comes from here, so a user
adapts the whole bundle by editing ``tools/bundle/config.yaml`` (or by passing
``overrides`` in code, which is how the end-to-end test shortens ``for``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

CONFIG_PATH = Path(__file__).with_name("config.yaml")


class BundleConfigError(Exception):
    """The bundle config is wrong; the message names the key."""


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, val in extra.items():
        if isinstance(val, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], val)
        else:
            out[key] = copy.deepcopy(val)
    return out


def load(path: Path | None = None, overrides: dict | None = None) -> dict[str, Any]:
    with open(path or CONFIG_PATH, encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)
    if overrides:
        cfg = _merge(cfg, overrides)
    for key in ("exporterSelector", "nodeLabel", "jobLabel", "runbookURLBase", "alerts"):
        if key not in cfg:
            raise BundleConfigError(f"bundle config: missing key {key!r}")
    for name, knobs in cfg["alerts"].items():
        if knobs.get("severity") not in ("critical", "warning", "info"):
            raise BundleConfigError(f"bundle config: alerts.{name}.severity must be critical, warning or info")
        if "for" not in knobs:
            raise BundleConfigError(f"bundle config: alerts.{name}.for is missing")
    return cfg
