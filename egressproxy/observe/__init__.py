"""What operators see: the access log, metrics, the admin and metrics HTTP services, worker snapshots, the egress address."""
