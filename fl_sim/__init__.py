"""The one-machine simulation: generated data, offline models, embedded broker, N devices."""
