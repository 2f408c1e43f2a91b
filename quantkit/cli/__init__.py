"""The `quantkit` command line: click parsing and terminal output only; every command calls the library."""
from quantkit.cli.app import cli, main

__all__ = ["cli", "main"]
