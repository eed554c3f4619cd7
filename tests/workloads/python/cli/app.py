"""A wasi:cli command in Python: prints its arguments, and a line to stderr."""
import sys

from wit_world import exports


class Run(exports.Run):
    def run(self) -> None:
        print("hello from python", sys.argv[1:])
        print("to stderr", file=sys.stderr)
