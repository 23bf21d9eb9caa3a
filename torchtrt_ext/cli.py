"""The ``torchtrt-ext`` command."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from . import demo as demo_module
from .core.calibration import CalibrationCache
from .core.errors import CalibrationError, EngineFileError
from .core.settings import describe_options
from .operations.calibrate import fingerprint, quantizable_layers
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
    calib = sub.add_parser("calib", help="show, compare, check or convert calibration caches")
    calib.add_argument("action", choices=["show", "diff", "validate", "convert"])
    calib.add_argument("cache", help="a calibration cache (torchtrt_ext's format or TensorRT's)")
    calib.add_argument("other", nargs="?", help="diff: the second cache; convert: the file to write")
    calib.add_argument("--model", help="validate: MODULE:CALLABLE returning the model (e.g. mypkg.models:build)")
    calib.add_argument("--to", choices=["torchtrt_ext", "tensorrt"], help="convert: the format to write")
    calib.add_argument("--names", help="a JSON file mapping our names to TensorRT's (convert and reading TensorRT caches)")
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
    if args.command == "calib":
        try:
            return _calib(args)
        except (CalibrationError, OSError, ValueError) as exc:
            print(f"torchtrt-ext calib {args.action}: {exc}", file=sys.stderr)
            return 1
    return 2  # pragma: no cover


def _calib(args: argparse.Namespace) -> int:
    ours_to_trt = {}
    if args.names:
        with open(args.names, encoding="utf-8") as f:
            ours_to_trt = json.load(f)
    cache = CalibrationCache.load(args.cache, names={v: k for k, v in ours_to_trt.items()})
    if args.action == "show":
        print(f"{args.cache}: {len(cache.names())} entries, method {cache.method}, model {cache.model_fingerprint}, "
              f"{cache.batches} batches ({cache.batches_hash})")
        for name in cache.names():
            print(f"  {cache.amax(name)!r:>24}  {name}")
        return 0
    if args.action == "diff":
        if not args.other:
            raise CalibrationError("diff takes two caches")
        differences = cache.diff(CalibrationCache.load(args.other, names={v: k for k, v in ours_to_trt.items()}))
        for name, (a, b) in differences.items():
            print(f"  {name}: {a!r} -> {b!r}")
        print(f"{len(differences)} difference(s)")
        return 1 if differences else 0
    if args.action == "convert":
        if not args.other or not args.to:
            raise CalibrationError("convert takes the file to write and --to torchtrt_ext|tensorrt")
        cache.save(args.other, format=args.to, names=ours_to_trt)
        print(f"wrote {args.other} ({args.to}, {len(cache.names())} entries)")
        return 0
    if not args.model:
        raise CalibrationError("validate takes --model MODULE:CALLABLE")
    module_name, _, attribute = args.model.partition(":")
    model = getattr(importlib.import_module(module_name), attribute)()
    found = fingerprint(model)
    if cache.model_fingerprint not in ("-", found):
        raise CalibrationError(
            f"the cache was calibrated on another model (fingerprint {cache.model_fingerprint}, this model {found}): "
            "calibrate this model"
        )
    cache.require(f"{name}:input" for name in quantizable_layers(model))
    print(f"{args.cache}: covers every quantizable layer of {type(model).__name__} ({len(quantizable_layers(model))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
