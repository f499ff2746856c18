import sys

from dream.cli import main

sys.exit(main())
