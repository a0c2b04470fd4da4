"""vLLM KV events: wire structs, decoding, publishing, subscribing, applying to a BlockIndex."""
