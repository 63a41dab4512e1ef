"""Inventory services over the ORM: one module per aggregate, each owning its transitions."""
