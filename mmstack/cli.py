"""Kept for one release: the `mmstack` command line moved to `mmstack.apps.cli` (the console script already
points there). `python -m mmstack.cli` and `from mmstack.cli import build_parser, main` still work."""
import sys

from mmstack.apps.cli import COMMANDS, LAZY_COMMANDS, build_parser, command, load_pipeline, main, model_arguments

__all__ = ["COMMANDS", "LAZY_COMMANDS", "build_parser", "command", "load_pipeline", "main", "model_arguments"]

if __name__ == "__main__":
    sys.exit(main())
