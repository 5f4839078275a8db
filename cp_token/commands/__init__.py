"""The ``cp-token`` subcommands, one module each: settings -> build -> serve (or run once)."""
