"""Standard-library primitives every component uses (time, backoff, singleflight, the
refresh-ahead policy, bounded caches, watched files, logging, child processes). Imports
nothing else of this project."""
