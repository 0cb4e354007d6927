"""KV-cache sampling."""
