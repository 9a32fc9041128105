"""Export pruned models to other runtimes' formats (GGUF for llama.cpp / ollama / LM Studio)."""

from daprune.export.gguf_writer import OUTTYPES, ExportResult, export_gguf

__all__ = ["OUTTYPES", "ExportResult", "export_gguf"]
