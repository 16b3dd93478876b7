"""Checks both processes make on their settings, and how they say what is wrong.

Pure functions with no I/O, used by `consumer.settings` and `producer.settings`
(pydantic validators) and by both entrypoints (`describe`), so that the two
programs refuse the same values with the same words.

A Kafka bootstrap list (`host[:port][,host[:port]…]`) and libpq's host lists
(`h1:5432,h2:5432`) share one rule: each port, where given, is a number from 1
to 65535. aiokafka and asyncpg would otherwise fail later, with an `int()`
error that names no setting, or (the bridge, which connects in the background)
not visibly at all.
"""

from __future__ import annotations

import logging

from pydantic import ValidationError


def port_ok(address: str) -> bool:
    """Whether `host[:port]` (an IPv6 host in brackets) has no port or a valid one."""
    if address.startswith("["):
        host, bracket, after_host = address[1:].partition("]")
        if not bracket or not host:
            return False
    else:
        after_host = address
    _, colon, port = after_host.rpartition(":")
    if not colon:
        return True
    return port.isascii() and port.isdigit() and 0 < int(port) < 65536


def check_bootstrap_servers(value: str) -> str:
    """`value` if it is a usable Kafka bootstrap list; ValueError (for a settings model) if not."""
    addresses = [a.strip() for a in value.split(",")]
    if not all(a and not a.startswith(":") and port_ok(a) for a in addresses):
        raise ValueError("must be host[:port][,host[:port]…] with ports from 1 to 65535")
    return value


def check_log_level(value: str) -> str:
    """The level's name in capitals, any case accepted; ValueError for one logging lacks."""
    level = value.strip().upper()
    if level not in logging.getLevelNamesMapping() or level == "NOTSET":
        raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return level


def describe(exc: ValidationError) -> str:
    """One line naming each variable, without its value (it may be a secret)."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        name = "_".join(str(part) for part in error["loc"]).upper() or "settings"
        problems.append(f"{name}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)
