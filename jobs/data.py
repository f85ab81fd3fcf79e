"""Ray Job entry point: `entityclip data` on the cluster (see jobs/README.md)."""
import sys

from entityclip.cli import main

sys.exit(main(["data", *sys.argv[1:]]))
