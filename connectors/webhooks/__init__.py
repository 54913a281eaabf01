"""Webhooks (CONTRACT §6, §7): endpoints registered by institutions over HTTP, and their delivery
with Standard Webhooks signatures from a consumer of the event log of their own."""
