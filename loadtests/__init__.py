"""Locust load tests against vLLM's OpenAI-compatible server."""
