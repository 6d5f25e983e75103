"""Shared utilities for PluralLLM (metrics and helpers used across training and evaluation)."""
