"""Export pruned models to other runtimes' formats (GGUF for llama.cpp / ollama / LM Studio).

The writer (torch, gguf, the model classes) is imported on first use, so that the CLI can list and check its
options without loading them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OUTTYPES", "ExportResult", "export_gguf"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from daprune.export import gguf_writer

        return getattr(gguf_writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
