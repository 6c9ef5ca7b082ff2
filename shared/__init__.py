"""The protocol both sides agree on: schemas, encoding, topics, configs, data formats.

Imports only the standard library, numpy, msgpack and cryptography, so it installs the same on a
Jetson and in the cloud. A test enforces that torch, paho and onnxruntime never load from here.

Byte formats, each with its module and its golden bytes (``tests/shared/``; a golden test that
fails means the format changed: bump that format's version, never edit the bytes):

==========================  ==============================  ==============================================
format                      module                          golden bytes
==========================  ==============================  ==============================================
msgpack maps (messages,     ``messages``, ``tensors``       ``test_golden`` (``fixtures/protocol_v1/``),
raw LE tensor buffers)                                      one per message kind
msgpack arrays (transfer    ``chunking``                    ``test_golden`` (``manifest``, ``chunk``)
manifests and chunks)
"SA" struct (SecAgg+        ``secagg.messages``             ``test_golden_formats`` (every kind, real
messages)                                                   bodies); ``test_golden`` (inside the envelope)
"TK" struct (top-k)         ``sparse`` (``topk_*``)         ``test_golden_formats``
tagged index sets           ``sparse`` (``*_indices``)      ``test_golden_formats``, ``test_sparse``
ring bit-packing            ``sparse`` (``*_ring``)         ``test_golden_formats``
crypto blobs: sealed and    ``_hazmat`` (layout),           ``test_crypto`` (blobs, associated data),
signed, their envelopes,    ``crypto``, ``secure``,         ``test_golden_formats`` (envelopes, share
SecAgg share bundles        ``secagg._crypto``              bundles inside "SA")
canonical JSON (all that    ``canonical`` (used by          ``test_golden_formats`` (the function,
is signed)                  ``release``, ``ledger``,        manifests, certificates, ledger lines)
                            ``authority``)
==========================  ==============================  ==============================================
"""
