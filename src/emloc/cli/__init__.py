"""The `emloc` command line (commands.py) and its demo job (demo.py)."""
from emloc.cli.commands import main

__all__ = ["main"]
