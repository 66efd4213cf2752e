import sys

from flux_migrate.pipeline.cli import main

sys.exit(main())
