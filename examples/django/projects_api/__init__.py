"""A small projects API behind plangate (adapters/plangate_django)."""
