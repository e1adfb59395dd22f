"""FixMatch on pytorch-ignite."""
__version__ = "0.1.0"
