"""Configuration, one module per component: env -> frozen, validated settings.

- :mod:`.common`: :class:`~.common.ConfigError`, the parsers and :class:`~.common.Env`, the
  typed reader every loader uses (standard library only);
- :mod:`.cp`: the CP token service (``cp-token serve``);
- :mod:`.sidecar`: the token sidecar (``cp-token-sidecar``);
- :mod:`.client`: the client library (``cp_token.client``, ``cp-token get``);
- :mod:`.inject`: the sidecar injector (``cp-token inject``).

Each loader takes the environment as a mapping (tests pass a dict, only entry points pass
``os.environ``), and a mistake raises ``ConfigError`` (:mod:`cp_token.runtime.errors`),
which the entry points turn into exit code 2 and one line naming the variable. Every default
is a named constant of the module that owns it; other modules import it from there.

This ``__init__`` imports nothing on purpose: the sidecar and the client load only
``common`` and their own module (the sidecar's memory, the client's server-free install).
"""
