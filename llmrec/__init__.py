"""llmrec: LLM-based sequential recommendation with latent reasoning tokens."""

__version__ = "0.1.0"
