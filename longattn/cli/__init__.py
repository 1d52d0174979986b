"""The `longattn` command line (`main.py` builds the parser; one module per subcommand)."""
from .main import main

__all__ = ["main"]
