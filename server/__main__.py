"""``t2i-serve`` / ``python -m server``: run the service with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from server.app import create_app
from server.settings import Settings, SettingsError, add_cli_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="t2i-serve", description="Serve Livepeer's text-to-image API on Triton."
    )
    add_cli_arguments(parser)
    parser.add_argument("--log-level", default="info")
    args = vars(parser.parse_args(argv))
    log_level = args.pop("log_level")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env(**args)
    except SettingsError as e:
        logging.getLogger("t2i-serve").error("%s", e)
        return 2
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level=log_level, log_config=None
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
