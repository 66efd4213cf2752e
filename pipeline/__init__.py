"""flux-migrate: settings, runner, checkpoints, errors, logging and CLI around the stages."""

__version__ = "0.1.0"
