"""Base models minituner ships: Mini-GPT (one nanoGPT-style file), its tokenizer, and the shape
specs of well-known models for the memory planner."""
