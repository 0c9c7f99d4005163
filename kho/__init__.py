"""kho: a high-throughput medical imaging archive (PACS)."""

__version__ = "0.1.0"
