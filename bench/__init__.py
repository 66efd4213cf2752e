"""`make bench`: flux-migrate against the ceiling and the alternatives, measured in one run."""
