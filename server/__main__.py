"""python -m server --model ID_OR_DIR --host H --port P --variant V"""

from __future__ import annotations

import asyncio
import logging
import sys

from server.app import run
from server.config import parse_args
from server.errors import StartupError


def main(argv: list[str] | None = None) -> int:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(run(config))
    except StartupError as exc:
        logging.getLogger("server").error("cannot start: %s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
