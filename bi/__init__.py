"""The customers' side of the platform: the customer portal (bi/portal.py)."""
