"""privlm: your own private LLM, from data to a served model, with its cost."""

__version__ = "0.1.0"
