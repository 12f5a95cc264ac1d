"""``python -m bench [variant_build|load|worker_memory] [args]``: runs a benchmark.

The default is the LoRA variant build one."""

from __future__ import annotations

import sys

from bench import load, variant_build, worker_memory

BENCHMARKS = {"variant_build": variant_build.main, "load": load.main, "worker_memory": worker_memory.main}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    name = args.pop(0) if args and args[0] in BENCHMARKS else "variant_build"
    return BENCHMARKS[name](args)


if __name__ == "__main__":
    sys.exit(main())
