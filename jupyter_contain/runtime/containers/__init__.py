"""Containers: spawn, rootfs plans, cgroups, networks, user namespaces, lifecycle.

Holds only the names that light importers need without loading the rest
(the CLI's argument parser offers ``NETWORK_MODES`` as choices).
"""

#: network modes, for option validation elsewhere (kernelspecs, CLI)
NETWORK_MODES: tuple[str, ...] = ("none", "bridge", "host")
