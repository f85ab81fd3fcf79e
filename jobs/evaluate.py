"""Ray Job entry point: `entityclip evaluate` on the cluster (see jobs/README.md)."""
import sys

from entityclip.cli import main

sys.exit(main(["evaluate", *sys.argv[1:]]))
