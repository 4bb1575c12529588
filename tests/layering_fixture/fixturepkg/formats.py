"""A middle layer that imports only downward."""

import fixturepkg.model  # noqa: F401
