"""``python -m fastvl info | bench | kernels``."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except BrokenPipeError:
        # The reader went away (`python -m fastvl info | head`): stop quietly, as shell tools
        # do; stdout goes to devnull so that the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="fastvl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, device, extension build, op x backend table")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    bench = commands.add_parser("bench", help="compare fastvl with PyTorch and peers on this device")
    from fastvl.bench.runner import add_arguments

    add_arguments(bench)
    kernels = commands.add_parser(
        "kernels", help="registers, spills, shared memory, occupancy and tensor-core use of "
                        "the Triton kernels at the benchmark shapes (compiled, no GPU needed)")
    kernels.add_argument("--arch", choices=("sm_90", "sm_80", "all"), default="sm_90")
    kernels.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args(argv)
    if args.command == "info":
        from fastvl.info import print_info

        return print_info(as_json=args.json)
    if args.command == "kernels":
        from fastvl.kernel_report import print_report

        return print_report(args.arch, as_json=args.json)
    from fastvl.bench.runner import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
