"""What every Ray worker process of a run sets up before it runs anything.

The driver names :data:`SETUP_HOOK` as its job's ``worker_process_setup_hook``, so each
worker, on every node, runs :func:`set_up_worker` first. This module is imported by
every worker, so it imports nothing heavy.

- **Its own cluster.** Ray's state API called without an address inside a worker (Ray
  Train 2.60's placement-group cleaner asks it whether the controller lives) looks for
  "the" local cluster among the GCS processes of the machine, and fails with
  ``ConnectionError: Found multiple active Ray instances`` when a second local Ray runs
  beside the run's (another experiment, a benchmark). Each worker sets ``RAY_ADDRESS``
  to its own cluster.
- **DDP on the node's address.** Gloo (DDP on CPUs) takes the address its ranks connect
  to from the host name, which resolves to 127.0.0.1 on hosts whose ``/etc/hosts`` says
  so (containers, network namespaces, some cloud images): ranks on two nodes then never
  meet ("Gloo connectFullMesh failed ... Connection refused, remote=[127.0.0.1]"). Each
  worker pins Gloo to the network interface that carries its node's Ray address, unless
  ``GLOO_SOCKET_IFNAME`` is set already.
"""

from __future__ import annotations

import os
import socket
import struct
import sys

SETUP_HOOK = "asd_ray.worker_setup.set_up_worker"
_SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


def set_up_worker() -> None:
    """Point this worker's Ray address lookups at its cluster, and Gloo at its node's address."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        interface = interface_of(ray.util.get_node_ip_address())
        if interface is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = interface


def interface_of(address: str) -> str | None:
    """The name of the network interface whose IPv4 address is ``address`` (Linux; None
    elsewhere or when no interface has it)."""
    if not sys.platform.startswith("linux"):
        return None
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                answer = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on it
                continue
            if socket.inet_ntoa(answer[20:24]) == address:
                return name
    return None
