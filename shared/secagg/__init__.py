"""Secure aggregation (SecAgg+ over Z_2^32) as pure, I/O-free code.

Public surface: fixed-point encoding (``quant``), the round's stage functions (``protocol``) and
their wire messages (``messages``). ``prg``, ``shamir`` and ``graph`` are exposed for tests and
benchmarks. Like the rest of ``shared``, its crypto primitives come from ``shared._hazmat``.
"""

from shared.secagg._crypto import ShareDecryptionError
from shared.secagg.messages import (AdvertiseKeys, BundleReceipt, ForwardedShares, MaskedInput, MaskPeers,
                                    NeighbourKeys, ShareKeys, UnmaskRequest, UnmaskShares, decode, encode)
from shared.secagg.protocol import (AggregateResult, ClientState, SecAggAbort, SecAggParams, ServerState,
                                    client_advertise, client_mask, client_masked_input, client_open_shares,
                                    client_share_keys, client_unmask, default_threshold, server_add_masked,
                                    server_collect_keys, server_collect_receipts, server_collect_shares, server_init, server_request_unmask, server_unmask,
                                    unmask_request_for)
from shared.secagg.quant import QuantConfig, dequantize_sum, error_bound, max_bits, quantize
from shared.secagg.shamir import ShareError

__all__ = [
    "AdvertiseKeys", "AggregateResult", "BundleReceipt", "MaskPeers", "client_mask", "client_open_shares",
    "server_collect_receipts", "ClientState", "ForwardedShares", "MaskedInput", "NeighbourKeys",
    "QuantConfig", "SecAggAbort", "SecAggParams", "ServerState", "ShareDecryptionError", "ShareError",
    "ShareKeys", "UnmaskRequest", "UnmaskShares", "client_advertise", "client_masked_input",
    "client_share_keys", "client_unmask", "decode", "default_threshold", "dequantize_sum", "encode",
    "error_bound", "max_bits", "quantize", "server_add_masked", "server_collect_keys",
    "server_collect_shares", "server_init", "server_request_unmask", "server_unmask", "unmask_request_for",
]

# The hardened round (signed adverts, consistency check) builds on the stage functions above.
from shared.secagg import hardened  # noqa: E402

__all__ += ["hardened"]
