"""Listening-socket handoff between two userproxy processes (``--handoff-socket PATH``).

HAProxy's seamless reload (``-x``) and Envoy's hot restart, for userproxy: the new process
takes the old one's listening sockets over a Unix socket (SCM_RIGHTS), so no socket is
closed in between and the kernel never refuses a client; the old one stops accepting
only once the new one serves, and drains what it holds.  The modules:

- ``wire``: the exchange's messages on a SOCK_SEQPACKET socket, versioned;
- ``path``: the socket file (owner-only, replaced by rename, never someone else's);
- ``giver``: the old process's side; ``taker``: the new process's side;
- ``coordinator``: when each side runs within a proxy's lifecycle (proxy.py calls it).

The sockets themselves go through hostnet/listen.py, where every listening socket is
made: what a process holds is listed there, and what it received is handed out there.
"""
