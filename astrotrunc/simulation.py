"""Forward model (placeholder, being written)."""
__all__ = []
