"""Ray Job entry point: `entityclip lm` on the cluster (see jobs/README.md)."""
import sys

from entityclip.cli import main

sys.exit(main(["lm", *sys.argv[1:]]))
