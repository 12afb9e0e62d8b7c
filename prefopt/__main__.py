import sys

from prefopt.cli.commands import main

sys.exit(main())
