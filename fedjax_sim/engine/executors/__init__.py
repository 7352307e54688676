"""Executors run the round's stages: :mod:`.compiled` (a block of rounds in one compiled program,
also vmapped over a sweep's runs and fed by a host-streamed population) and :mod:`.host_loop`
(Python drives rounds, chunks and local steps, for convolutions on XLA:CPU)."""
