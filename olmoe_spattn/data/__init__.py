"""Training data: synthetic token files for the CPU demo, and local text -> OLMo-core numpy tokens."""
