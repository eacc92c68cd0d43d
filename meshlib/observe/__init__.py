"""The Observe pillar's tools built on the mesh's telemetry (exporters, the service graph)."""
