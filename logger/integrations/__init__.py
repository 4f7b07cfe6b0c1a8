"""Callbacks for training frameworks: `integrations.lightning`, `integrations.transformers`.

Each module imports its framework only when it is imported itself.
"""
