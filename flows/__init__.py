"""Bytewax dataflows. Run one with ``python -m bytewax.run flows.embed:flow`` or
``embedstream run``."""
