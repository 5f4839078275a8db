"""The token sidecar: holds the pod's API token, refreshes it before expiry, serves it on
loopback, optionally writes it to a file, and rides out short CP outages."""
