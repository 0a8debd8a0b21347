"""Model adapters: the only place that knows diffusers classes (one adapter per family)."""
