"""The operator's tools, `order-consumer <tool>`: one module each, and what they share.

A tool module has `add_parser(commands)` (its subcommand, with a description that
names where its settings are documented) and `async main(args, settings) -> int`;
`TOOLS` lists them, and consumer/__main__.py registers and runs every tool from it,
so a new tool is one module and one entry. What they share is in `cli.py` (the
one-line refusals, the database connection) and consumer/exits.py (the exit
statuses). The other modules here serve one tool each: `stripe_books` is
`reconcile --with-stripe`; `backfill_runs` and `events_api` are `backfill`'s cursor
and its reading of Stripe's Events API.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from intentflow.consumer.exits import EXIT_CANNOT, EXIT_REFUSED
from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.tools import backfill, dlq, outbox, prune, reconcile
from intentflow.consumer.tools.cli import CannotRun, Refused

TOOLS: dict[str, ModuleType] = {
    "reconcile": reconcile,
    "dlq": dlq,
    "prune": prune,
    "outbox": outbox,
    "backfill": backfill,
}


async def run(name: str, args: argparse.Namespace, settings: ConsumerSettings) -> int:
    """Tool `name`: what it cannot do is one line on stderr, and its exit status."""
    try:
        status: int = await TOOLS[name].main(args, settings)
    except CannotRun as exc:
        print(f"order-consumer {name}: {exc}", file=sys.stderr)
        return EXIT_CANNOT
    except Refused as exc:
        print(f"order-consumer {name}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    return status
