"""The ``torchtrt-ext`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from . import demo as demo_module
from .core.errors import EngineFileError
from .core.settings import describe_options
from .operations.files import inspect as inspect_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchtrt-ext", description="torchtrt_ext tools")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compile a small model both ways and check it against eager")
    demo.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    demo.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    sub.add_parser("options", help="list the compile options")
    inspect = sub.add_parser("inspect", help="print an engine file's header, tensors and sizes")
    inspect.add_argument("file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    if args.command == "demo":
        return demo_module.run(args.device, args.dtype)
    if args.command == "options":
        print(describe_options())
        return 0
    if args.command == "inspect":
        try:
            print(inspect_file(args.file))
        except EngineFileError as exc:
            print(f"torchtrt-ext inspect: {exc}", file=sys.stderr)
            return 1
        return 0
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
