"""The networks: architecture encoding, search space, torch ops, the mixed op, the supernet and the derived network.

``arch`` (block strings, networks as versioned JSON, pure Python) and ``space`` (stages of mixed layers over
generated candidates, pure Python) come first; ``ops`` (with ``depthwise``) builds a layer from its block string,
``mixed_op`` puts binary gates over candidate ops, ``supernet`` assembles mixed layers, and ``network`` rebuilds a
derived network from its JSON alone. Imports go one way, in that order; of the rest of ``proxyless_ray`` this
package imports only ``fileio`` and ``choices``, so the latency model, the search and the plots can all build on it.
"""
