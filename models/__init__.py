"""Data shapes: ORM tables (`orm`), Temporal payloads (`contracts`), API bodies (`schemas`)."""
