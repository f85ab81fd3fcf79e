"""Ray Job entry point: `entityclip explain` on the cluster (see jobs/README.md)."""
import sys

from entityclip.cli import main

sys.exit(main(["explain", *sys.argv[1:]]))
