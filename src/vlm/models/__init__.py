"""Model parts (encoders, resamplers, projectors, LLMs) and their composition."""
