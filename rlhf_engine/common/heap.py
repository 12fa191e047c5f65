"""The heap of a process whose program starts by importing torch, transformers or vLLM and then runs for long (a
generator, a trainer): the cyclic garbage collector paused while it starts, then its survivors frozen.

Those imports and a model's construction allocate ~1M objects that live as long as the process, and with the
collector on they trigger full collections that scan all of them again: measured on a vLLM generator's start (2
cores), 9 full collections during its imports alone took 1.2 CPU-seconds, and a collection of the started process
scans the whole heap each time. Only a process's program pauses the collector (the command line), never the library:
`settle` does nothing where the collector runs, so a program that embeds the library keeps its own.
"""

from __future__ import annotations

import gc


def pause_collection() -> None:
    """Pause the cyclic garbage collector while this process starts (until `settle`)."""
    gc.disable()


def set_aside() -> None:
    """Within the start (where `pause_collection` paused the collector): keep what is allocated so far out of the
    collections the rest of the start asks for itself. vLLM's engine build calls gc.collect() three times, each a
    scan of the whole heap with torch, transformers and vLLM imported (1.3 CPU-seconds of a generator's start,
    measured); `settle` takes it back into its one collection."""
    if not gc.isenabled():
        gc.freeze()


def settle() -> None:
    """The end of the start: where `pause_collection` paused the collector, collect once, freeze what survived (out
    of every later collection: it lives as long as the process), and resume collecting what the run allocates."""
    if gc.isenabled():
        return
    gc.unfreeze()  # what `set_aside` froze is collected once too
    gc.collect()
    gc.freeze()
    gc.enable()
