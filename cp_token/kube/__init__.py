"""The only package that speaks to the Kubernetes API: the client, its transport, and the
short-lived cache of the objects the CP reads."""
