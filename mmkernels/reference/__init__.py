"""Plain-PyTorch implementations: the executable spec, the CPU path and the test oracle."""
