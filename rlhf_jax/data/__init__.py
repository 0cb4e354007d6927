"""Tokenizers, chat templates, datasets and synthetic tasks."""
