"""Ray Job entry point: `entityclip sweep` on the cluster (see jobs/README.md)."""
import sys

from entityclip.cli import main

sys.exit(main(["sweep", *sys.argv[1:]]))
