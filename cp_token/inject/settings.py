"""The injector's settings, at their older import path: see :mod:`cp_token.settings.inject`."""

from cp_token.settings.inject import MIN_TOKEN_EXPIRATION, InjectSettings, load_inject_settings

__all__ = ["MIN_TOKEN_EXPIRATION", "InjectSettings", "load_inject_settings"]
