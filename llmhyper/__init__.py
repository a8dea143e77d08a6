"""llmhyper: an LLM as a hypernetwork that writes the CTR-model weights of brand-new ads."""

__version__ = "0.1.0"
