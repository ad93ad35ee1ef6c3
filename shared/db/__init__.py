"""The router's PostgreSQL schema and the helpers to reach and migrate it."""
