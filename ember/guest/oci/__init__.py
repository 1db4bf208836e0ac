"""OCI image sources for the template builder: an image in, a root filesystem out.

:func:`extract_oci` reads an OCI image layout, a ``docker save`` tarball or a registry and
unpacks the image's layers, safely, into an empty directory; :func:`apply_layer` applies
one layer tar. Everything else in this package is private.
"""

from __future__ import annotations

from ember.guest.oci.config import ImageConfig, PulledImage
from ember.guest.oci.layers import apply_layer
from ember.guest.oci.source import extract_oci

__all__ = ["ImageConfig", "PulledImage", "apply_layer", "extract_oci"]
