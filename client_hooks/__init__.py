"""gradsentry client hooks: stream gradient telemetry from a PyTorch training loop."""
