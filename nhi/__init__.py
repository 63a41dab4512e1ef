"""nhi-lifecycle: governed lifecycle for the non-human identities AI agents use."""

MANAGED_BY = "nhi-lifecycle"
