"""The daemon's edges and its orchestration: Daemon, enforcer, toolstack actuator, audit files,
metrics (and their HTTP endpoint), configuration, systemd notify (see docs/architecture.md)."""
