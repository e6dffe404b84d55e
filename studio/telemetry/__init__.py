"""Request logs, the metrics endpoint and the usage analytics built from the logs."""
