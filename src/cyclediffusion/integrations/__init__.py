"""Bridges to other libraries' models (imported lazily: the core never needs them)."""
