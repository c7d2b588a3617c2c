"""vLLM plugin serving ``moe_compress`` checkpoints (the plugin itself lands with its own issue)."""
