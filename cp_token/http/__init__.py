"""What every server of the project (the CP, the sidecar, the injector) shares: limits at the
edge, the run loop, probes and bounded request bodies. Imports nothing of the CP's decision."""
