"""CLI subcommands, one module each (see surgeon/cli.py)."""
