"""Endpoints grouped by audience: inference (metering + upstream), account, funding, ops."""
