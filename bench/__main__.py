"""``python -m bench [variant_build|load|overhead|transport|worker_memory|models] [args]``: one benchmark;
without a name, all in turn."""

from __future__ import annotations

import sys

from bench import load, models, overhead, transport, variant_build, worker_memory

BENCHMARKS = {
    "variant_build": variant_build.main,
    "load": load.main,
    "overhead": overhead.main,
    "transport": transport.main,
    "worker_memory": worker_memory.main,
    "models": models.main,
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in BENCHMARKS:
        return BENCHMARKS[args[0]](args[1:])
    for run in BENCHMARKS.values():
        if status := run(args):
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
