"""The aggregator service: selects devices, runs rounds, aggregates, evaluates, checkpoints."""
