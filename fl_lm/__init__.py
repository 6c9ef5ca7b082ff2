"""Language-model plumbing shared by the edge client and the aggregator (torch, transformers, peft).

Both ``edge_client`` and ``aggregator`` import this; neither imports the other. Everything heavy
is imported inside functions so importing this package stays cheap.
"""
