"""The edge client: LoRA-trains the student on private data and sends only adapter updates."""
