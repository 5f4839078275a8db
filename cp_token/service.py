"""The CP's wiring, at its older import path: see :mod:`cp_token.wiring`."""

from cp_token.wiring import Service, build_service, exchange_config

__all__ = ["Service", "build_service", "exchange_config"]
