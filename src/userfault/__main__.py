"""`python -m userfault`: the command line."""

from .cli import main

raise SystemExit(main())
