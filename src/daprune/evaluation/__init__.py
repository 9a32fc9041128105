"""Perplexity, zero-shot accuracy, speed benchmarks and the comparison table."""
