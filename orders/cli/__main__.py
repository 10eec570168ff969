"""python -m orders.cli: the `orders` command."""

from orders.cli.main import main

main()
