"""Launchers that tests, demos and benches use (not part of the cache's data path)."""
