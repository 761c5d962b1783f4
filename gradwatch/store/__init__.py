"""The run store: one schema, a background writer, and a pandas reader that never imports torch."""
