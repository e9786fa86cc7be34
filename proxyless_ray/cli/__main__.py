"""``python -m proxyless_ray.cli``: the same as the ``proxyless-ray`` console script."""

import sys

from proxyless_ray.cli import main

sys.exit(main())
