"""Fast path piece ``shared_contexts``: associations share the listener's supported presentation contexts.

pynetdicom deep-copies the server's supported contexts for each association it accepts
(``RequestHandler._create_association``): for the 171 contexts of 45 transfer syntaxes each that the listener
supports, ~50 ms of CPU under the GIL per association, stalling every other association of the process
meanwhile. Negotiation only reads them (``negotiate_as_acceptor`` answers with new contexts), so a copy of the
list itself is all each association gets. ``tests/integration/test_fastpath_shared_contexts.py`` fails if
pynetdicom stops deep-copying them.
"""

from __future__ import annotations

from typing import Any

from pynetdicom.presentation import PresentationContext


class SharedContexts(list[PresentationContext]):
    """The listener's supported presentation contexts, shared by every association instead of copied for each."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        return list(self)
