"""The exit statuses of `order-consumer`, named once (README, "Exit statuses").

  0  EXIT_OK       done; for `reconcile`, every check held
  1  EXIT_FOUND    `reconcile`: a violation, or a difference with Stripe. Also what
                   Python exits with on a bug, after its traceback
  2  EXIT_CANNOT   one line on stderr names what an operator must fix: a setting,
                   an option, a service away or refusing, a schema behind, a topic missing
  3  EXIT_REFUSED  the broker refused records (`dlq replay`, `backfill`) or a dead letter
                   (`run`): one line names them; what went before stays done
128 + N: a second stop signal (SIGTERM is 15: 143).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FOUND = 1
EXIT_CANNOT = 2
EXIT_REFUSED = 3
