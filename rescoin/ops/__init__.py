"""Operating a host: configuration, the daemon, its state and paths, status, metrics, agent deploy."""
