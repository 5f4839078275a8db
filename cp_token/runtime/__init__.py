"""Standard-library primitives every component uses (time, backoff, singleflight, bounded
caches, watched files, logging, child processes). Imports nothing else of this project."""
