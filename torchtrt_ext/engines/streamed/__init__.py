"""The weight-streaming engine kind and its parts: partition, placement, program."""

from .engine import StreamedEngine, streaming_device

__all__ = ["StreamedEngine", "streaming_device"]
