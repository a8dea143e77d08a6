"""The LLM layer: `settings` (one table of LM settings and defaults), `embedded` (the local model and its
server), `build` (build_lm -> LMHandle), `calls` (usage and call records)."""
