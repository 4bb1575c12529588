import sys

from laformer.cli import main

sys.exit(main())
