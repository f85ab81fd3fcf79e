"""Ray Job entry point: `entityclip index` on the cluster (see jobs/README.md)."""
import sys

from entityclip.cli import main

sys.exit(main(["index", *sys.argv[1:]]))
