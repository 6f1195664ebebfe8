"""Test helpers: tiny CnC components (no network)."""
