"""A soak of the proxy under churn: tagged backends, verifying clients, a churn driver.

See docs/soak.md.  ``python -m tests.soak --loop uvloop --minutes 10`` runs a long one;
``tests/soak/test_soak.py`` runs about a minute per event loop.
"""
