"""Training data: synthetic token files for the CPU demo, and local text -> OLMo-core numpy tokens."""

#: token dtype names accepted by ``prepare-data --dtype`` ("auto": the one OLMo-core infers);
#: here, not in :mod:`.prepare`, so the command's --help needs no numpy
DTYPES: tuple[str, ...] = ("auto", "uint8", "uint16", "uint32", "uint64")
