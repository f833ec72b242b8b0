"""Kubernetes resource quantities (``500m``, ``4Gi``, ``1G``), read as Kubernetes reads them.

The cncf.kubernetes provider's ``kubernetes.utils.parse_quantity`` is not there under the Docker
runner, and it accepts spellings the API server refuses (``1K``), so a job file is checked against
the grammar of k8s.io/apimachinery's resource.Quantity itself; tests compare the values with the
provider's parser where it is installed.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError

#: Kubernetes' quantity grammar (k8s.io/apimachinery resource.Quantity): a signed decimal number,
#: then a binary suffix (Ki = 2^10 ... Ei = 2^60), a decimal one (n, u, m, "", k, M ... E) or an
#: exponent (e3, E-2). "1G" is 10^9 bytes, "1Gi" 2^30, "1.5Gi" is fine, "1GB" is not a quantity.
QUANTITY = re.compile(r"(?P<number>[+-]?(?:\d+\.?\d*|\.\d+))(?P<suffix>[KMGTPE]i|[numkMGTPE]?|[eE][+-]?\d+)")
_BINARY = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
#: The largest quantity Kubernetes stores (a signed 64-bit integer of its unit); a larger one is a typo.
MAX_QUANTITY = 2**63 - 1
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


def quantity_value(text: str) -> Decimal:
    """The number a Kubernetes quantity stands for (``"1.5Gi"`` -> 1610612736)."""
    match = QUANTITY.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    number, suffix = Decimal(match["number"]), match["suffix"]
    if suffix in _BINARY:
        return number * 2 ** _BINARY[suffix]
    exponent = _DECIMAL[suffix] if suffix in _DECIMAL else int(suffix[1:])
    return number.scaleb(exponent)


def _quantity(value: Any) -> str:
    """A resource amount as the pod spec takes it: Kubernetes' own spelling, checked, not negative."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not QUANTITY.fullmatch(value.strip()) or quantity_value(value.strip()) < 0:
        raise PydanticCustomError("quantity", "a Kubernetes quantity such as 500m, 2, 4G or 1.5Gi")
    if quantity_value(value.strip()) > MAX_QUANTITY:
        raise PydanticCustomError(
            "quantity", f"a Kubernetes quantity of at most {MAX_QUANTITY} (Kubernetes keeps a quantity in 64 bits)"
        )
    return value.strip()


Quantity = Annotated[str, BeforeValidator(_quantity)]


def docker_memory(quantity: str) -> str:
    """A memory quantity as Docker spells it: whole bytes, in the largest binary unit that divides
    them (``4Gi`` -> ``4g``, ``1G`` -> ``976562500k``; Docker's ``g`` is 2^30)."""
    size = int(-(-quantity_value(quantity) // 1))  # Kubernetes rounds a fraction of a byte up
    for unit, shift in (("g", 30), ("m", 20), ("k", 10)):
        if size and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return f"{size}b"


def docker_cpus(quantity: str) -> float:
    """A CPU quantity as Docker's ``cpus`` (``1500m`` -> 1.5)."""
    return float(quantity_value(quantity))
