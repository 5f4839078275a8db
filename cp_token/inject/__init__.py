"""The sidecar injector (``cp-token inject``): a mutating admission webhook.

``patch`` decides and builds the JSON Patch (pure), ``app`` is the HTTP door, ``server``
serves it over HTTPS, ``settings`` reads ``CP_TOKEN_INJECT_*``.
"""
