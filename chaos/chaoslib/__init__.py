"""Switchyard fault suite (chaos/run)."""
