"""userproxy: a userspace TCP/UDP service proxy that does the job of kube-proxy."""

from __future__ import annotations

__version__ = "0.1.0"
