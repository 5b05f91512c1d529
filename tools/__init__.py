"""Maintenance scripts run from a checkout (not installed): `make lock` runs lock.py."""
