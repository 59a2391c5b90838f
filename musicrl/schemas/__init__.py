"""Pydantic schemas that are contracts between services (records, events, API bodies)."""
