"""The process: the twistd service, its runtimes, workers, reloads and drains, and the egressproxy command."""
