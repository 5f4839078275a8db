"""The sidecar injector (``cp-token inject``): a mutating admission webhook.

``patch`` decides and builds the JSON Patch (pure), ``app`` is the HTTP door,
:mod:`cp_token.commands.inject` serves it over HTTPS; :mod:`cp_token.settings.inject` reads
``CP_TOKEN_INJECT_*``.
"""
