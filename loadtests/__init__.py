"""Locust load tests against vLLM's OpenAI-compatible server (added with the load-test issue)."""
