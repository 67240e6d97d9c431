"""InstallTicket: a delta's copy into its device slot, which may still be in flight.

On CUDA the device pool copies a delta from pinned host memory into its slot on a stream of its own
(:meth:`~bitdelta.serving.layers.DevicePool.install`), so decode steps queued on the compute stream
meanwhile do not wait behind the copy. The ticket holds the event recorded after the copy: the slot
may be read only once the event has completed. The engine polls :meth:`ready` between steps (an
event query never blocks) and admits the slot's requests when it says so; :meth:`wait` blocks, for
when nothing else would run meanwhile. On the CPU the copy is done when ``install`` returns: the
ticket has no event and is always ready.

    ticket = pool.install(delta_slot, host)
    ticket.ready()                # True once the copy has completed: work launched after that sees it
    ticket.wait()                 # or block until then
"""

from __future__ import annotations


class InstallTicket:
    """Whether a slot's copy has landed; ``event``: a CUDA event recorded after it (None: done)."""

    def __init__(self, event=None) -> None:
        self.event = event

    def ready(self) -> bool:
        """True once the copy has completed on the device (never blocks)."""
        if self.event is not None and self.event.query():
            self.event = None  # completed events stay completed: no more queries
        return self.event is None

    def wait(self) -> None:
        """Blocks the calling thread until the copy has completed."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None
