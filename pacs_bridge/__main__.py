"""``python -m pacs_bridge`` runs the command line."""

from __future__ import annotations

from pacs_bridge.cli import main

if __name__ == "__main__":
    main()
