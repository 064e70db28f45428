"""Reaching the other side: clusters, the dial, address checks, the circuit breaker and health checks."""
