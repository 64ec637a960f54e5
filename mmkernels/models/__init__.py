"""The thin model layer: LLaMA and its checkpoint loading."""
