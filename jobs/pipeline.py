"""Ray Job entry point: `entityclip pipeline` on the cluster (see jobs/README.md)."""
import sys

from entityclip.cli import main

sys.exit(main(["pipeline", *sys.argv[1:]]))
