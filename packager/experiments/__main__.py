import sys

from packager.experiments.cli import main

sys.exit(main())
