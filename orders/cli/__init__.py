"""The `orders` command: run the services or the local stack, set up schemas, and call every RPC.

One module per job: main (parser, settings, exit status), services, up, client and printing, seed,
verify, and reach (is a database there).
"""

from orders.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
