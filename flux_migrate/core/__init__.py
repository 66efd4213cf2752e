"""The foundation: schema model, errors, source and target connections, bookkeeping.

Imports nothing else of the project."""
