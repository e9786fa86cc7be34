"""CLI subcommands, one module each (registered in :mod:`proxyless_ray.cli`)."""
