"""Integrations of jetmoe with other inference engines (each imported only where that engine is installed)."""
