import sys

from kvpilot.router.main import cli

sys.exit(cli())
