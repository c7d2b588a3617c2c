"""Offline compressor for MoE checkpoints."""
