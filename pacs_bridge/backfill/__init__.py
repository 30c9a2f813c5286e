"""Backfill: feed the studies a PACS already holds into the index, from their metadata alone.

``windows`` plans the StudyDate windows (pure), ``dicomweb`` and ``dimse`` ask the PACS (QIDO-RS + WADO-RS
metadata, or C-FIND), ``runner`` records what they find through the index's public ingest API, keeping the
windows done in ``index/backfill_progress``, and ``progress`` shows it. ``command`` wires them from the
configuration for ``pacs-bridge backfill``.
"""
