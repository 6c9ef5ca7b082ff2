"""The protocol both sides agree on: schemas, encoding, topics, configs, data formats.

Imports only the standard library, numpy, msgpack and cryptography, so it installs the same on a
Jetson and in the cloud. A test enforces that torch, paho and onnxruntime never load from here.
"""
