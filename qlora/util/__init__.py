"""Helpers that every layer may use and that import nothing of qlora."""
