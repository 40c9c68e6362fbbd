#!/usr/bin/env python3
"""Not implemented yet: see issue 5. Exits with status 2 and writes nothing."""
import sys

print(f"{sys.argv[0]}: not implemented yet (issue 5)", file=sys.stderr)
sys.exit(2)
