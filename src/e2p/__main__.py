"""`python -m e2p ...` is `e2p ...`."""
import sys

from .cli import main

sys.exit(main())
