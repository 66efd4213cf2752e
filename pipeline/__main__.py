"""``python -m flux_migrate.pipeline`` and the ``flux-migrate`` command.

The CLI is imported only when this runs as the program: a worker process re-imports the main
module (as ``__mp_main__``), and would otherwise load every module of the tool."""

import sys


def main() -> int:
    from flux_migrate.pipeline.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
