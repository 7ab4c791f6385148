"""``python -m trtserve.client infer|models|bench ...``: the client subcommands without the server package."""
from __future__ import annotations

import sys

from trtserve.client.cli import main

if __name__ == "__main__":
    sys.exit(main())
