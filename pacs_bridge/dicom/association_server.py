"""pynetdicom's association server, fed connections instead of accepting them itself.

The bridge accepts connections in its own front door (dicom/front_door.py) and holds them until their
association request is whole; only then is each passed to this server's ``process_request`` (socketserver's
public entry point), which serves it exactly as pynetdicom's own accept loop would: a thread that creates the
association, the same events and handlers. Nothing is bound or listened on here.
"""

from __future__ import annotations

from pynetdicom.transport import ThreadedAssociationServer


class AdoptingAssociationServer(ThreadedAssociationServer):
    """A ``ThreadedAssociationServer`` without a listening socket of its own."""

    def server_bind(self) -> None:
        pass

    def server_activate(self) -> None:
        pass
