"""Explain: LLM-written explanations of the entities a text names (prompts, engines, pipeline)."""
