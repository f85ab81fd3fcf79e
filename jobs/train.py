"""Ray Job entry point: `entityclip train` on the cluster (see jobs/README.md)."""
import sys

from entityclip.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
